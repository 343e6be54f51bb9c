//! Nubis VMM: one KVM microVM per process.
//!
//! The crate is laid out like the machine it builds: `arch` knows how an x86_64
//! guest is booted (memory map, page tables, CPUID, MP table), `vstate` wraps the
//! KVM VM and vCPU file descriptors, `devices` holds the emulated hardware,
//! `builder` assembles a VM from a [`config::VmConfig`], `runtime` runs it (the
//! epoll event loop and the vCPU threads) and `control` is the Unix-socket API
//! through which the host agent drives a running VM; `snapshot` and
//! `migration` save a VM and move it to another process or host; `jailer`
//! builds the sandbox that `nubis-jailer` starts a VMM in; `run` is `nubis
//! run`, one command in a fresh guest, as a library.

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
#[doc(hidden)]
pub mod fuzz_api;
pub mod jailer;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod persist;
pub mod platform;
pub mod rate_limiter;
pub mod run;
pub mod runtime;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;
