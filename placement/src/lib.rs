//! Where the cluster controller puts a VM (issue #16).
//!
//! Scheduling as in Nomad or Kubernetes: filters drop the hosts that cannot
//! take the VM ([`filter`]), a score picks one of the rest ([`Strategy`]),
//! and when none is left the decision says which filter excluded which host
//! ([`Explanation`]), for the VM's event log; the VM stays pending and is
//! tried again when the cluster changes.
//!
//! Pure functions of their inputs: no I/O, no clock, no randomness, and the
//! order hosts come in does not matter (ties go to the first name). The
//! controller builds the inputs from etcd and applies the decision, so all
//! of this is tested without a cluster. Inputs are not trusted to be
//! consistent: any numbers, a host allocated beyond its capacity, a group
//! member on a host that is gone, give a decision, never a panic.

pub mod host;
pub mod request;
pub mod resources;

pub use host::{
    format_labels, parse_labels, FaultDomain, HostState, HostView, LabelError, NetworkReach,
    FAULT_DOMAIN_LABEL,
};
pub use request::{AntiAffinity, GroupMember, Request, Scope, Strategy};
pub use resources::Resources;
