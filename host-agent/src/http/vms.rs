//! `/v1/vms`: a tenant's microVMs, their lifecycle, console and events.

use axum::body::Body as ResponseBody;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nubis_api::{ApiError, ErrorCode, Vm, VmCreate, VmEvent, VmNic, VmState};
use serde::Deserialize;

use super::{images, overlay, AppState, Body, Caller, HttpError, Path, Query, Result};
use crate::ipv4::Cidr;
use crate::network;
use crate::store::NewVm;
use crate::supervisor::networking::nic_address;
use crate::supervisor::read_console;
use crate::validate;

/// Largest vCPU count and memory a VM may ask for here (the VMM checks
/// against the host again).
const MAX_VCPUS: u32 = 254;
const MIN_MEMORY_MIB: u64 = 32;
const MAX_DATA_DISKS: usize = 8;
const MAX_DISK_MIB: u64 = 1 << 24;
const MAX_NICS: usize = 4;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{id}", get(show).delete(remove))
        .route("/v1/vms/{id}/start", post(start))
        .route("/v1/vms/{id}/stop", post(stop))
        .route("/v1/vms/{id}/force-stop", post(force_stop))
        .route("/v1/vms/{id}/reboot", post(reboot))
        .route("/v1/vms/{id}/pause", post(pause))
        .route("/v1/vms/{id}/resume", post(resume))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/vms/{id}/events", get(events))
}

fn check_rate(field: &str, limit: &nubis_api::RateLimit) -> Result<()> {
    if limit.bytes_per_s == Some(0) || limit.ops_per_s == Some(0) {
        return Err(
            ApiError::invalid(field, "a rate of 0 would stop the device: leave it out").into(),
        );
    }
    Ok(())
}

fn check(request: &VmCreate) -> Result<()> {
    validate::name("name", &request.name, false)?;
    validate::kernel_args("kernel_args", &request.kernel_args)?;
    if !(1..=MAX_VCPUS).contains(&request.vcpus) {
        return Err(ApiError::invalid("vcpus", format!("must be 1 to {MAX_VCPUS}")).into());
    }
    if request.memory_mib < MIN_MEMORY_MIB {
        return Err(
            ApiError::invalid("memory_mib", format!("must be at least {MIN_MEMORY_MIB}")).into(),
        );
    }
    if request.disks.len() > MAX_DATA_DISKS {
        return Err(
            ApiError::invalid("disks", format!("at most {MAX_DATA_DISKS} data disks")).into(),
        );
    }
    check_rate("root_rate_limit", &request.root_rate_limit)?;
    for (index, disk) in request.disks.iter().enumerate() {
        if !(1..=MAX_DISK_MIB).contains(&disk.size_mib) {
            return Err(ApiError::invalid(
                &format!("disks[{index}].size_mib"),
                format!("must be 1 to {MAX_DISK_MIB}"),
            )
            .into());
        }
        check_rate(&format!("disks[{index}].rate_limit"), &disk.rate_limit)?;
    }
    if request.nics.len() > MAX_NICS {
        return Err(ApiError::invalid("nics", format!("at most {MAX_NICS} NICs")).into());
    }
    for (index, nic) in request.nics.iter().enumerate() {
        check_rate(&format!("nics[{index}].rate_limit"), &nic.rate_limit)?;
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "vms",
    request_body = VmCreate,
    responses(
        (status = 201, description = "success", body = Vm),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 403, description = "operator token", body = ApiError),
        (status = 409, description = "the name exists", body = ApiError),
        (status = 422, description = "no such image or network", body = ApiError),
        (status = 429, description = "quota exceeded, or no free address left on a network", body = ApiError),
        (status = 500, description = "the host refused the NICs' rules", body = ApiError),
        (status = 502, description = "an overlay network's home host failed", body = ApiError),
        (status = 507, description = "the host's disk would go below its reserve", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<VmCreate>,
) -> Result<(StatusCode, Json<Vm>)> {
    let tenant_id = caller.tenant()?.to_string();
    check(&request)?;
    // The NICs as the agent will record them: MAC, address and tap are
    // assigned here, never taken from the request.
    let mut nics: Vec<VmNic> = request
        .nics
        .iter()
        .map(|nic| VmNic {
            rate_limit: nic.rate_limit,
            network: nic.network.clone(),
            ..VmNic::default()
        })
        .collect();
    let image = images::find(&state, &caller, &request.image).map_err(|_| {
        HttpError(ApiError {
            error: nubis_api::error::ErrorBody {
                code: ErrorCode::Unprocessable,
                message: format!("no image '{}'", request.image),
                field: Some("image".to_string()),
            },
        })
    })?;
    let tenant = state
        .store
        .get_tenant(&tenant_id)?
        .ok_or_else(|| HttpError::new(ErrorCode::Unauthorized, "the token's tenant is gone"))?;
    // NICs on overlay networks homed on another host get their address
    // from that host (no lock held while asking: the home takes its own).
    let mut remote_grants = Vec::new();
    for (index, nic) in nics.iter_mut().enumerate() {
        let Some(wanted) = &nic.network else { continue };
        let net = nic_network(&state, &tenant_id, index, wanted)?;
        if let Some(home) = overlay::remote_home(&state, &net)? {
            let granted = overlay::remote_address(&state, &home, &net, &request.name).await;
            let address = match granted {
                Ok(address) => address,
                Err(err) => {
                    overlay::release_remote_addresses(&state, &remote_grants).await;
                    return Err(err);
                }
            };
            if let Some(parsed) = nic_address(&address) {
                remote_grants.push((net.clone(), parsed));
            }
            nic.network = Some(net.id);
            nic.address = Some(address);
            nic.mac = Some(network::random_mac()?.to_string());
            nic.tap = None;
        }
    }
    let created = create_locked(&state, request, nics, &tenant_id, &image, tenant.quota).await;
    match created {
        Ok(vm) => Ok((StatusCode::CREATED, Json(vm))),
        Err(err) => {
            overlay::release_remote_addresses(&state, &remote_grants).await;
            Err(err)
        }
    }
}

/// The tenant's network that NIC `index` names.
fn nic_network(
    state: &AppState,
    tenant_id: &str,
    index: usize,
    wanted: &str,
) -> Result<nubis_api::Network> {
    state
        .store
        .get_network(Some(tenant_id), wanted)?
        .ok_or_else(|| {
            HttpError(ApiError {
                error: nubis_api::error::ErrorBody {
                    code: ErrorCode::Unprocessable,
                    message: format!("no network '{wanted}'"),
                    field: Some(format!("nics[{index}].network")),
                },
            })
        })
}

/// Assigns this host's addresses and MACs, and records the VM.
async fn create_locked(
    state: &AppState,
    request: VmCreate,
    mut nics: Vec<VmNic>,
    tenant_id: &str,
    image: &nubis_api::Image,
    quota: nubis_api::Quota,
) -> Result<Vm> {
    let tenant_id = tenant_id.to_string();
    // Addresses and MACs are assigned under one lock, so that concurrent
    // creations never hand out the same address.
    let network_lock = state.supervisor.network_lock().await;
    // Disk space: the root disk (the image's size) and the data disks at
    // their full size, as a cloud bills them.
    let asked_mib = crate::quota::mib_of(image.rootfs_bytes)
        + request.disks.iter().map(|disk| disk.size_mib).sum::<u64>();
    crate::quota::check_storage(&state.store, &state.data_dir, &tenant_id, &quota, asked_mib)?;
    let reserve = state.supervisor.config().reserved_disk_mib;
    crate::quota::check_host_space(&state.data_dir, reserve, asked_mib)?;
    if !nics.is_empty() {
        let vms = state.store.list_vms(Some(&tenant_id), None)?;
        // Addresses in use, across the tenant's VMs and this request.
        let mut used: std::collections::HashSet<std::net::Ipv4Addr> = vms
            .iter()
            .flat_map(|vm| vm.nics.iter())
            .filter_map(|nic| nic.address.as_deref().and_then(nic_address))
            .collect();
        let exhausted = |what: &str| {
            HttpError::new(
                ErrorCode::QuotaExceeded,
                format!("no free address left in {what}"),
            )
        };
        for (index, nic) in nics.iter_mut().enumerate() {
            if nic.address.is_some() {
                // Granted by the network's home host (see `create`).
                continue;
            }
            let (address, prefix) = match &nic.network {
                Some(wanted) => {
                    let net = nic_network(state, &tenant_id, index, wanted)?;
                    // Those the home granted to other hosts' VMs too.
                    used.extend(overlay::used_addresses(state, &net)?);
                    let cidr: Cidr = net.cidr.parse().map_err(|err: String| {
                        HttpError::new(
                            ErrorCode::Internal,
                            format!("stored network {}: {err}", net.id),
                        )
                    })?;
                    nic.network = Some(net.id);
                    let address = cidr.allocate(&used).ok_or_else(|| exhausted(&net.cidr))?;
                    (address, cidr.prefix())
                }
                None => {
                    let subnet = state.store.tenant_subnet(&tenant_id)?;
                    let hosts = used
                        .iter()
                        .filter(|address| address.octets()[..3] == [10, 88, subnet])
                        .map(|address| address.octets()[3])
                        .collect();
                    let host = network::free_host(&hosts, subnet)
                        .map_err(|_| exhausted(&format!("10.88.{subnet}.0/24")))?;
                    let address = std::net::Ipv4Addr::new(10, 88, subnet, host);
                    (address, 24)
                }
            };
            used.insert(address);
            nic.address = Some(format!("{address}/{prefix}"));
            nic.mac = Some(network::random_mac()?.to_string());
            nic.tap = None;
        }
    }
    let vm = state.store.create_vm(
        &NewVm {
            tenant_id,
            name: request.name,
            image_id: image.id.clone(),
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            kernel_args: request.kernel_args,
            root_rate_limit: request.root_rate_limit,
            disks: request.disks,
            nics,
            restore_from: None,
        },
        quota,
    )?;
    state.store.add_event(&vm.id, "created", "VM defined")?;
    drop(network_lock);
    if !vm.nics.is_empty() {
        // The anti-spoofing rules of its NICs exist before its taps do; a
        // VM whose rules the host refused is not kept, to run unguarded.
        if let Err(err) = state.supervisor.reconcile_network().await {
            state.store.delete_vm(&vm.id)?;
            return Err(err.into());
        }
    }
    tracing::info!(vm = %vm.id, tenant = %vm.tenant_id, "VM created");
    Ok(vm)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    state: Option<String>,
    name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    params(("state" = Option<VmState>, Query, description = "only VMs in this state"), ("name" = Option<String>, Query, description = "only the VM with this name")),
    responses(
        (status = 200, description = "success", body = Vec<Vm>),
        (status = 400, description = "invalid input", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<Vm>>> {
    let wanted = match &query.state {
        Some(text) => Some(VmState::parse(text).ok_or_else(|| {
            HttpError(ApiError::invalid(
                "state",
                format!("unknown state '{text}'"),
            ))
        })?),
        None => None,
    };
    let mut vms = state.store.list_vms(caller.scope(), wanted)?;
    if let Some(name) = &query.name {
        vms.retain(|vm| &vm.name == name);
    }
    Ok(Json(vms))
}

/// The caller's VM `id` (id or name; any tenant's, by id, for the operator).
pub(super) fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Vm> {
    state
        .store
        .get_vm(caller.scope(), id)?
        .ok_or_else(|| HttpError::not_found("VM", id))
}

#[utoipa::path(
    get,
    path = "/v1/vms/{id}",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    Ok(Json(find(&state, &caller, &id)?))
}

/// Runs `action` on the VM under its lock, with a fresh copy of it, and
/// returns the VM as it is afterwards.
async fn act<F, Fut>(state: &AppState, caller: &Caller, id: &str, action: F) -> Result<Json<Vm>>
where
    F: FnOnce(AppState, Vm) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let vm = find(state, caller, id)?;
    let _guard = state.supervisor.lock(&vm.id).await;
    let vm = find(state, caller, &vm.id)?;
    let vm_id = vm.id.clone();
    action(state.clone(), vm).await?;
    Ok(Json(find(state, caller, &vm_id)?))
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/start",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "running", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError),
        (status = 422, description = "cannot be done (e.g. a missing file)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        let image = super::images::usable_image(&state, &vm)?;
        state.supervisor.start(&vm, &image).await?;
        Ok(())
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/stop",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "stopped (Ctrl-Alt-Del, forced after the agent's timeout)", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        Ok(state.supervisor.stop(&vm, false).await?)
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/force-stop",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "stopped", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn force_stop(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        Ok(state.supervisor.stop(&vm, true).await?)
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/reboot",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "running again", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError),
        (status = 422, description = "cannot be done (e.g. a missing file)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn reboot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        state.supervisor.stop(&vm, false).await?;
        let image = super::images::usable_image(&state, &vm)?;
        let stopped = state
            .store
            .get_vm(None, &vm.id)?
            .ok_or_else(|| HttpError::not_found("VM", &vm.id))?;
        state.supervisor.start(&stopped, &image).await?;
        Ok(())
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/pause",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "paused", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        Ok(state.supervisor.pause(&vm, true).await?)
    })
    .await
}

#[utoipa::path(
    post,
    path = "/v1/vms/{id}/resume",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "running", body = Vm),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError),
        (status = 409, description = "wrong state or already exists", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vm>> {
    act(&state, &caller, &id, |state, vm| async move {
        Ok(state.supervisor.pause(&vm, false).await?)
    })
    .await
}

/// Deletes a VM, stopping it at once first if it runs.
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 204, description = "deleted (stopped first if it ran)"),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let vm = find(&state, &caller, &id)?;
    let _guard = state.supervisor.lock(&vm.id).await;
    let vm = find(&state, &caller, &vm.id)?;
    if vm.state.has_process() {
        state.supervisor.stop(&vm, true).await?;
    }
    state.supervisor.remove_files(&vm)?;
    state.store.delete_vm(&vm.id)?;
    if !vm.nics.is_empty() {
        // Its NICs' rules and port forwards go with it.
        state.supervisor.reconcile_network().await?;
        overlay::release_remote_addresses(&state, &overlay_nics(&state, &vm)?).await;
    }
    tracing::info!(vm = %vm.id, "VM deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `vm`'s NICs on overlay networks, with their addresses.
fn overlay_nics(
    state: &AppState,
    vm: &Vm,
) -> Result<Vec<(nubis_api::Network, std::net::Ipv4Addr)>> {
    let mut nics = Vec::new();
    for nic in &vm.nics {
        let (Some(id), Some(address)) =
            (&nic.network, nic.address.as_deref().and_then(nic_address))
        else {
            continue;
        };
        if let Some(net) = state.store.get_network(None, id)? {
            if net.overlay.is_some() {
                nics.push((net, address));
            }
        }
    }
    Ok(nics)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsoleQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    follow: bool,
}

const CONSOLE_CHUNK: usize = 256 * 1024;

/// The serial console log: `offset` resumes a read (the next offset is in
/// `X-Console-Offset`); `follow=true` streams new output until the VM stops.
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/console",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)"), ("offset" = Option<u64>, Query, description = "byte offset to read from; the next one is in X-Console-Offset"), ("follow" = Option<bool>, Query, description = "stream new output until the VM stops")),
    responses(
        (status = 200, description = "the console log as text", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 400, description = "an unknown or ill-typed query parameter", body = ApiError),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn console(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ConsoleQuery>,
) -> Result<Response> {
    let vm = find(&state, &caller, &id)?;
    let path = state.supervisor.console_path(&vm.id);
    if !query.follow {
        let (data, next) = read_console(&path, query.offset, CONSOLE_CHUNK).map_err(|err| {
            HttpError::new(
                ErrorCode::Internal,
                format!("cannot read the console log: {err}"),
            )
        })?;
        return Ok((
            [
                (
                    header::CONTENT_TYPE,
                    "text/plain; charset=utf-8".to_string(),
                ),
                (
                    header::HeaderName::from_static("x-console-offset"),
                    next.to_string(),
                ),
            ],
            data,
        )
            .into_response());
    }
    let store = state.store.clone();
    let stream = futures_util::stream::unfold((query.offset, false), move |(offset, done)| {
        let (path, store, vm_id) = (path.clone(), store.clone(), vm.id.clone());
        async move {
            if done {
                return None;
            }
            loop {
                let (data, next) = match read_console(&path, offset, CONSOLE_CHUNK) {
                    Ok(read) => read,
                    Err(err) => return Some((Err(err), (offset, true))),
                };
                if !data.is_empty() {
                    return Some((Ok::<_, std::io::Error>(data), (next, false)));
                }
                let running = matches!(
                    store.get_vm(None, &vm_id),
                    Ok(Some(vm)) if vm.state.has_process()
                );
                if !running {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        ResponseBody::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/v1/vms/{id}/events",
    tag = "vms",
    params(("id" = String, Path, description = "id (or name)")),
    responses(
        (status = 200, description = "success", body = Vec<VmEvent>),
        (status = 401, description = "no or unknown token", body = ApiError),
        (status = 404, description = "no such resource (or another tenant's)", body = ApiError)
    ),
    security(("bearer" = []))
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<VmEvent>>> {
    let vm = find(&state, &caller, &id)?;
    Ok(Json(state.store.events(&vm.id)?))
}
