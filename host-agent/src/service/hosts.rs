//! The hosts `/v1/hosts` shows: the cluster's members in cluster mode,
//! this host alone when it is standalone. Cordoning and forgetting act on
//! placement, which only a cluster has: a standalone host refuses them.

use nubis_api::{ClusterHost, HostDrain, HostResources, HostState};

use super::{Result, ServiceError, Services};
use crate::cluster::drain::{DEFAULT_PARALLEL, MAX_PARALLEL};
use crate::cluster::settings::HostName;
use crate::store::now;

/// What a standalone host says of itself.
#[derive(Debug, Clone)]
pub struct LocalHostInfo {
    pub name: String,
    pub fingerprint: String,
    pub api_address: Option<String>,
    pub underlay_address: Option<String>,
    pub capacity: HostResources,
    pub started_at: u64,
}

impl Default for LocalHostInfo {
    fn default() -> Self {
        LocalHostInfo {
            name: "local".into(),
            fingerprint: String::new(),
            api_address: None,
            underlay_address: None,
            capacity: HostResources::default(),
            started_at: now(),
        }
    }
}

/// This host, standalone, with what its VMs take now.
fn standalone(svc: &Services) -> Result<ClusterHost> {
    let local = &svc.local_host;
    let (usage, vms) = crate::capacity::used(&svc.store)?;
    Ok(ClusterHost {
        name: local.name.clone(),
        state: HostState::Up,
        cordoned: false,
        controller: false,
        roles: vec!["compute".into()],
        labels: Default::default(),
        fingerprint: local.fingerprint.clone(),
        api_address: local.api_address.clone(),
        underlay_address: local.underlay_address.clone(),
        capacity: Some(local.capacity),
        usage: Some(usage),
        vms: Some(vms),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        started_at: Some(local.started_at),
        joined_at: local.started_at,
        drain: None,
    })
}

fn parse_name(name: &str) -> Result<HostName> {
    name.parse()
        .map_err(|_| ServiceError::not_found("host", name))
}

fn standalone_refusal(what: &str) -> ServiceError {
    ServiceError::Conflict(format!(
        "this agent is a standalone host: {what} needs cluster mode (nubis-agent --cluster etcd=URL)"
    ))
}

/// Every host.
pub async fn list(svc: &Services) -> Result<Vec<ClusterHost>> {
    match &svc.cluster {
        Some(cluster) => Ok(cluster.hosts().await?),
        None => Ok(vec![standalone(svc)?]),
    }
}

/// Host `name`.
pub async fn get(svc: &Services, name: &str) -> Result<ClusterHost> {
    match &svc.cluster {
        Some(cluster) => Ok(cluster.host(&parse_name(name)?).await?),
        None => {
            let local = standalone(svc)?;
            if local.name == name {
                Ok(local)
            } else {
                Err(ServiceError::not_found("host", name))
            }
        }
    }
}

/// Cordons host `name` (no new VMs are placed on it) or uncordons it.
pub async fn set_cordon(svc: &Services, name: &str, cordoned: bool) -> Result<ClusterHost> {
    let cluster = svc
        .cluster
        .as_ref()
        .ok_or_else(|| standalone_refusal(if cordoned { "cordoning" } else { "uncordoning" }))?;
    Ok(cluster.set_cordon(&parse_name(name)?, cordoned).await?)
}

/// Drains host `name`: cordoned, its running VMs moved away (each as its
/// `placement.on_drain` says), `max_parallel` at most at once.
pub async fn drain(svc: &Services, name: &str, request: HostDrain) -> Result<ClusterHost> {
    let cluster = svc
        .cluster
        .as_ref()
        .ok_or_else(|| standalone_refusal("draining"))?;
    let max_parallel = request.max_parallel.unwrap_or(DEFAULT_PARALLEL);
    if !(1..=MAX_PARALLEL).contains(&max_parallel) {
        return Err(ServiceError::invalid(
            "max_parallel",
            format!("must be 1 to {MAX_PARALLEL}"),
        ));
    }
    Ok(cluster.drain(&parse_name(name)?, max_parallel).await?)
}

/// Forgets host `name`, which is down for good.
pub async fn forget(svc: &Services, name: &str) -> Result<()> {
    let cluster = svc
        .cluster
        .as_ref()
        .ok_or_else(|| standalone_refusal("forgetting a host"))?;
    Ok(cluster.forget(&parse_name(name)?).await?)
}
