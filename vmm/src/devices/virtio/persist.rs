//! Snapshot state of virtio devices: the transport's registers and the
//! queues' positions (so that the driver and the device agree on where the
//! rings stand after a restore), and each device's own state; and why a
//! saved state is refused. The transport and each device implement
//! [`crate::persist::Persist`] next to their fields; [`DeviceState`] is how
//! the transport reaches a device it knows only as a `dyn VirtioDevice`.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::block::persist::{BlockState, BlockStateError};
use super::console::persist::ConsoleState;
use super::net::persist::{NetState, NetStateError};
use super::vsock::persist::VsockState;
use super::ActivateError;
use crate::persist::Versioned;

/// A queue's configuration and ring positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(state: QueueState) -> Self {
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx: state.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(snapshot: QueueSnapshot) -> Self {
        QueueState {
            max_size: snapshot.max_size,
            next_avail: snapshot.next_avail,
            next_used: snapshot.next_used,
            event_idx_enabled: snapshot.event_idx,
            size: snapshot.size,
            ready: snapshot.ready,
            desc_table: snapshot.desc_table,
            avail_ring: snapshot.avail_ring,
            used_ring: snapshot.used_ring,
        }
    }
}

/// A device's own state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    Block(Versioned<BlockState>),
    Net(Versioned<NetState>),
    Rng,
    Console(Versioned<ConsoleState>),
    Vsock(Versioned<VsockState>),
}

impl DeviceState {
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Rng => "rng",
            DeviceState::Console(_) => "console",
            DeviceState::Vsock(_) => "vsock",
        }
    }

    /// The refusal of this state by a device of another kind; `expected`
    /// names the device's own ("a disk's").
    pub fn wrong_kind(&self, expected: &'static str) -> DeviceStateError {
        DeviceStateError::WrongKind {
            found: self.kind(),
            expected,
        }
    }
}

/// Why a virtio device refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("a {found} device's state, not {expected}")]
    WrongKind {
        found: &'static str,
        expected: &'static str,
    },
    #[error(transparent)]
    Block(#[from] BlockStateError),
    #[error(transparent)]
    Net(#[from] NetStateError),
}

/// Why a virtio-mmio transport refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("virtio device type {device} where the snapshot has {saved}")]
    DeviceType { device: u32, saved: u32 },
    #[error("{saved} queue(s) saved, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {index}: saved with {saved} entries at most, the device has {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("queue {index}: {reason:?}")]
    Queue {
        index: usize,
        reason: virtio_queue::Error,
    },
    #[error("queue {index} is not valid in guest memory")]
    QueueOutsideMemory { index: usize },
    #[error(transparent)]
    Device(#[from] DeviceStateError),
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

/// One virtio-mmio device: its transport registers, queues and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub device_status: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    /// The transport's queues before activation, the device's after.
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceState,
}

impl crate::persist::VersionedState for TransportState {
    const COMPONENT: &'static str = "virtio-mmio transport";
    const VERSION: u16 = 1;
}
