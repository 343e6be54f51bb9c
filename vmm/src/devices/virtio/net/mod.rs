//! virtio-net on a Linux tap device.
//!
//! `tap` opens the host side (by name, or a descriptor handed over by the
//! agent) with `IFF_VNET_HDR`, so that the guest's checksum and segmentation
//! offloads travel with each frame and the host kernel does that work.
//! `frame` moves frames between the tap and guest descriptor chains, which it
//! treats as hostile input; `rx` fits a received frame into one or more
//! receive chains. `device` ties both to the RX and TX queues and to
//! the event loop: the tap being readable, queue kicks and rate-limiter
//! timers drive it; nothing polls.

pub mod device;
pub mod frame;
pub mod persist;
pub mod rx;
pub mod tap;

pub use device::{Net, NetError, VIRTIO_ID_NET};
pub use tap::{Tap, TapError};
