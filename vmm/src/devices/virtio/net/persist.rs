//! What a virtio-net device adds to its transport's snapshot state: both
//! directions' rate limiters, the counters, and a frame read from the tap
//! but not yet delivered to the guest (lost otherwise).

use serde::{Deserialize, Serialize};

use crate::rate_limiter::LimiterState;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub rx_limiter: LimiterState,
    pub tx_limiter: LimiterState,
    pub pending_rx_frame: Vec<u8>,
    pub counters: [u64; 6],
}

impl crate::persist::VersionedState for NetState {
    const COMPONENT: &'static str = "virtio-net";
    const VERSION: u16 = 1;
}

/// Why a NIC refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum NetStateError {
    #[error(
        "NIC {id} has another MAC than the saved NIC (the guest's driver knows the saved one)"
    )]
    Mac { id: String },
    #[error("NIC {id}: a pending frame of {len} bytes is larger than any frame")]
    PendingFrame { id: String, len: usize },
}
