//! virtio-blk: a raw disk image file as a guest block device.

pub mod device;
pub mod persist;
pub mod request;
pub mod tracker;

pub use device::{Block, BlockError};
