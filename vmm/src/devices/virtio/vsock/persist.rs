//! What a virtio-vsock device adds to its transport's snapshot state: the
//! guest's context id, for the record. Connections are not saved: their
//! host ends are sockets of the process that ends with the snapshot. The
//! restored device tells the guest its transport was reset (the event
//! queue's `TRANSPORT_RESET`, as Firecracker does), so the guest drops its
//! connections and re-reads its context id, which the restoring VM's
//! config may have changed (a clone's).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

impl crate::persist::VersionedState for VsockState {
    const COMPONENT: &'static str = "virtio-vsock";
    const VERSION: u16 = 1;
}
