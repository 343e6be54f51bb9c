//! Wrappers around KVM's VM and vCPU file descriptors.

pub mod persist;
pub mod vcpu;
pub mod vm;
