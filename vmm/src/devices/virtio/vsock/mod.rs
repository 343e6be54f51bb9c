//! virtio-vsock: stream sockets between the guest and host processes,
//! without a network. The host side is Unix sockets in Firecracker's
//! convention (see [`muxer`]), so that tools written for Firecracker's
//! vsock work unchanged.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod persist;

pub use device::{Vsock, VIRTIO_ID_VSOCK};
