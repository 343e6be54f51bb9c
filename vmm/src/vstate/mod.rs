//! Wrappers around KVM's VM and vCPU file descriptors.

pub mod vcpu;
pub mod vm;
