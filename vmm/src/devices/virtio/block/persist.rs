//! What a virtio-blk device adds to its transport's snapshot state: the
//! rate limiter (levels and limits) and the request counters. The backing
//! file comes from the restoring VM's config (it may have moved hosts).

use serde::{Deserialize, Serialize};

use crate::rate_limiter::LimiterState;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The disk's size when saved: a restore onto another size is refused.
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub limiter: LimiterState,
    pub counters: [u64; 6],
}
