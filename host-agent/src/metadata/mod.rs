//! The instance metadata service: what a VM may learn about itself over
//! HTTP at 169.254.169.254, in the layout of EC2's (the paths cloud-init's
//! EC2 datasource reads), with IMDSv2's session tokens.
//!
//! This module holds the parts that do not touch the network: the session
//! tokens ([`tokens`]) and the answer to each path ([`content`]). The
//! listener and the rules that bring a VM's requests to it are the host's
//! (see the README's "Metadata service").

pub mod content;
pub mod inputs;
pub mod server;
pub mod tokens;
