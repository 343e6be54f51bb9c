//! Emulated hardware: the buses that route port and MMIO accesses from the
//! vCPUs, and the legacy devices every microVM has.

pub mod bus;
pub mod legacy;
pub mod virtio;
