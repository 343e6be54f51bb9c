//! Nubis host agent: the daemon that makes a host part of a cloud. It keeps
//! tenants, images and VMs in SQLite (`store`), authenticates every request
//! (`auth`), serves the REST API (`http`, one file per resource), and runs
//! each VM as its own `nubis-vmm` process that it supervises, adopts again
//! after its own restart, and drives through the VMM's control socket
//! (`supervisor`). The domain logic between the API and the rest is in
//! `service`, one module per resource. Hosts that carry a network together call each other
//! (`peers`).

pub mod auth;
pub mod capacity;
pub mod cluster;
pub mod config;
pub mod crash;
pub mod disks;
pub mod http;
pub mod ipv4;
pub mod metadata;
pub mod network;
pub mod peer_directory;
pub mod peer_tls;
pub mod peers;
pub mod quota;
pub mod service;
pub mod store;
pub mod supervisor;
pub mod validate;
