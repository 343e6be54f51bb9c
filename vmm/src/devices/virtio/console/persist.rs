//! What a virtio-console device adds to its transport's snapshot state: a
//! chain the guest sent that the host had not yet taken whole. The backend
//! (descriptor or file) comes from the restoring VM's config.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// The transmit chain being written out: its head and the bytes the
    /// backend has not taken yet. The restored device writes them, then
    /// returns the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_pending: Option<PendingTx>,
}

impl crate::persist::VersionedState for ConsoleState {
    const COMPONENT: &'static str = "virtio-console";
    const VERSION: u16 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTx {
    pub head: u16,
    pub bytes: Vec<u8>,
}
