//! Wrappers around KVM's VM and vCPU file descriptors.

pub mod exit;
pub mod persist;
pub mod vcpu;
pub mod vm;
