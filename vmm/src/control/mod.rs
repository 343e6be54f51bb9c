//! The control socket: how the host agent (or a person with `socat`) drives
//! a running VM. See `protocol` for the wire format.

pub mod protocol;
pub mod server;
