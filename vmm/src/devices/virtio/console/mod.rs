//! virtio-console: byte channels between the guest and the host, one port
//! per device (no MULTIPORT), each a `/dev/hvcN` tty in a Linux guest.
//!
//! Why a console device rather than more UARTs: a UART moves one byte per
//! exit, a virtqueue moves a page per kick, and each device is a channel of
//! its own (`nubis run` keeps a command's stdout, stderr and its control
//! messages apart this way).

pub mod backend;
pub mod device;
pub mod persist;

pub use backend::{ConsoleBackend, ConsoleBackendError};
pub use device::{Console, VIRTIO_ID_CONSOLE};
