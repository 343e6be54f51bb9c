//! What a VM asks of its host, and the VMs already placed in groups.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Resources;

/// One VM to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The VM's name (its key in the cluster); only used to tell it apart
    /// from the other members of its anti-affinity group.
    pub vm: String,
    pub needs: Resources,
    /// Labels the host must have, with these values
    /// (`"placement": {"require": {"zone": "cloud"}}`).
    #[serde(default)]
    pub require: BTreeMap<String, String>,
    /// Networks (by id) the VM has NICs on, which the host must carry.
    #[serde(default)]
    pub networks: BTreeSet<String>,
    #[serde(default)]
    pub anti_affinity: Option<AntiAffinity>,
    /// The host the VM names, if any. The filters still apply to it.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
}

impl Request {
    /// A request for `needs` with no other constraint.
    pub fn new(vm: impl Into<String>, needs: Resources) -> Self {
        Request {
            vm: vm.into(),
            needs,
            require: BTreeMap::new(),
            networks: BTreeSet::new(),
            anti_affinity: None,
            host: None,
            strategy: Strategy::default(),
        }
    }
}

/// No two VMs of `group` on one host, or, with [`Scope::FaultDomain`], in
/// one fault domain; or, when `preferred`, as few as can be: the VM goes
/// where its group has the fewest members (then as the strategy says),
/// and a host is never refused for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AntiAffinity {
    pub group: String,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub preferred: bool,
}

/// How far apart the VMs of an anti-affinity group must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// On different hosts.
    #[default]
    Host,
    /// In different fault domains (see [`crate::FAULT_DOMAIN_LABEL`]).
    FaultDomain,
}

/// Which of the hosts that can take a VM gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The least loaded: VMs spread out, a host failure takes fewer of them.
    #[default]
    Spread,
    /// The most loaded that still fits: hosts fill up and whole hosts stay
    /// free for big VMs (or to be switched off).
    BinPack,
}

/// A VM already placed, in an anti-affinity group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupMember {
    pub vm: String,
    pub group: String,
    pub host: String,
}
