//! What a virtio-blk device adds to its transport's snapshot state: the
//! rate limiter (levels and limits) and the request counters. The backing
//! file comes from the restoring VM's config (it may have moved hosts).

use std::path::PathBuf;

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

impl crate::persist::VersionedState for BlockState {
    const COMPONENT: &'static str = "virtio-block";
    const VERSION: u16 = 1;
}

fn access(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// Why a disk refused a saved state: the restoring VM's disk is not the
/// one the guest knew.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("disk {} holds {found} bytes, the saved disk held {saved}", .path.display())]
    Capacity {
        path: PathBuf,
        found: u64,
        saved: u64,
    },
    #[error("disk {} is {}, the saved disk was {}", .path.display(), access(*.found), access(*.saved))]
    ReadOnly {
        path: PathBuf,
        found: bool,
        saved: bool,
    },
}
