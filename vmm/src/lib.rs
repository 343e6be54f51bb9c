//! Nubis VMM: one KVM microVM per process.
//!
//! The crate is laid out like the machine it builds: `arch` knows how an x86_64
//! guest is booted (memory map, page tables, CPUID, MP table), `vstate` wraps the
//! KVM VM and vCPU file descriptors (and the reasons a VM stops), `devices`
//! holds the emulated hardware and `device_manager` puts one VM's devices on
//! their buses; `builder` assembles a VM from a [`config::VmConfig`], booting
//! or from a snapshot, `runtime` runs it (the epoll event loop and the vCPU
//! threads) and `control` is the Unix-socket API through which the host agent
//! drives a running VM. Every stateful component implements
//! [`persist::Persist`]; `parts` is what a running VM's state is taken from,
//! `snapshot` and `migration` save a VM and move it to another process or
//! host. The layers go one way: `runtime` uses `migration`, neither is used
//! by `parts`, `device_manager`, `devices` or `vstate`. Outside this crate:
//! the sandbox a VMM runs in (`nubis-jailer`, no KVM code), `nubis run`
//! (`nubis-run`, a client of the VMM through `nubis-contract`).

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
#[doc(hidden)]
pub mod fuzz_api;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod parts;
pub mod persist;
pub mod platform;
pub mod rate_limiter;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod startup;
pub mod vstate;
