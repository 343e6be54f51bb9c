//! System-call filters, one per thread class: what is left to a VMM that a
//! guest has taken over. The lists are data (`vmm/seccomp/x86_64.json`,
//! seccompiler's JSON format, each entry with why it is there), compiled to
//! BPF when the VMM is built (`vmm/build.rs`, as Firecracker does), so a
//! start installs them without parsing or compiling anything; a call
//! outside its thread's list kills the whole process (SIGSYS).
//!
//! - `vmm`: the main thread once the VM runs (the event loop: devices, the
//!   control socket, snapshots). Installed after every setup step, so
//!   opening the kernel, creating the VM and mapping its memory need no
//!   place in it. Threads it starts later (a migration's) inherit it.
//! - `vcpu`: each vCPU thread, before its first `KVM_RUN`; only the KVM
//!   ioctls a vCPU makes (running, saving its state for a snapshot).
//! - `migration`: a live migration's sender, on top of `vmm`'s.

use std::sync::atomic::{AtomicBool, Ordering};

/// The filters as BPF programs, compiled from the JSON by build.rs.
mod compiled {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot install the {class} seccomp filter: {source}")]
    Install {
        class: &'static str,
        source: seccompiler::Error,
    },
}

/// A class of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    Vmm,
    Vcpu,
    Migration,
}

impl ThreadClass {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Migration => "migration",
        }
    }

    /// This class's filter, as built.
    pub fn program(self) -> &'static [seccompiler::sock_filter] {
        match self {
            Self::Vmm => compiled::VMM,
            Self::Vcpu => compiled::VCPU,
            Self::Migration => compiled::MIGRATION,
        }
    }

    #[cfg(test)]
    const ALL: [Self; 3] = [Self::Vmm, Self::Vcpu, Self::Migration];
}

/// Whether this process installs filters: set by [`enable`]; without it
/// (`--no-seccomp`), [`apply`] installs nothing.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// From now on each thread class installs its own filter.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Installs `class`'s filter on the calling thread (nothing if filters
/// are not enabled).
pub fn apply(class: ThreadClass) -> Result<(), SeccompError> {
    if ENABLED.load(Ordering::SeqCst) {
        seccompiler::apply_filter(class.program()).map_err(|source| SeccompError::Install {
            class: class.name(),
            source,
        })?;
    }
    // Also without filters: the tests show that the same call is then
    // harmless, so that it is the filter that kills.
    test_trigger(class);
    Ok(())
}

/// Debug builds only (what the tests run): with NUBIS_SECCOMP_TEST_TRIGGER
/// naming this class, the thread makes a call no filter allows, right
/// after installing its filter, which must kill the process.
fn test_trigger(class: ThreadClass) {
    if cfg!(debug_assertions)
        && std::env::var("NUBIS_SECCOMP_TEST_TRIGGER").is_ok_and(|wanted| wanted == class.name())
    {
        log::warn!(
            "seccomp test trigger: {} thread calls personality(2)",
            class.name()
        );
        // SAFETY: personality(0xffffffff) only queries the execution domain.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
        log::error!("seccomp test trigger: the forbidden call returned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists as written.
    const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

    #[test]
    fn the_built_filters_are_the_json_compiled() {
        let mut compiled = seccompiler::compile_from_json(
            FILTERS_JSON.as_bytes(),
            seccompiler::TargetArch::x86_64,
        )
        .unwrap();
        for class in ThreadClass::ALL {
            let program = compiled.remove(class.name()).unwrap();
            assert!(!program.is_empty(), "{class:?}");
            assert_eq!(class.program(), program.as_slice(), "{class:?}");
        }
        assert!(
            compiled.is_empty(),
            "filters no class installs: {compiled:?}"
        );
    }

    #[test]
    fn every_rule_says_why_it_is_there() {
        let document: serde_json::Value = serde_json::from_str(FILTERS_JSON).unwrap();
        for class in ThreadClass::ALL {
            let filter = &document[class.name()];
            assert_eq!(filter["default_action"], "kill_process", "{class:?}");
            for rule in filter["filter"].as_array().unwrap() {
                assert!(
                    rule["comment"]
                        .as_str()
                        .is_some_and(|text| !text.is_empty()),
                    "{class:?}: {rule} has no comment"
                );
            }
        }
    }

    #[test]
    fn dangerous_calls_are_in_no_list() {
        let document: serde_json::Value = serde_json::from_str(FILTERS_JSON).unwrap();
        for class in ThreadClass::ALL {
            let names: Vec<&str> = document[class.name()]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|rule| rule["syscall"].as_str())
                .collect();
            for forbidden in [
                "execve",
                "execveat",
                "ptrace",
                "mount",
                "umount2",
                "pivot_root",
                "chroot",
                "setuid",
                "setgid",
                "unshare",
                "setns",
                "kexec_load",
                "init_module",
                "bpf",
                "personality",
                "open_by_handle_at",
                "process_vm_writev",
            ] {
                assert!(!names.contains(&forbidden), "{class:?} allows {forbidden}");
            }
            // Only the main thread installs a filter after its own (the
            // migration thread's, which narrows what it inherits).
            assert_eq!(
                names.contains(&"seccomp"),
                class == ThreadClass::Vmm,
                "{class:?}"
            );
            // Sockets only for the migration stream (IPv4 or IPv6) and, on
            // the main thread, a guest's vsock connections to host
            // listeners (Unix): nothing raw and no packet sockets.
            for rule in document[class.name()]["filter"].as_array().unwrap() {
                if rule["syscall"] == "socket" {
                    let domain = rule["args"][0]["val"].as_u64();
                    let unix = domain == Some(1) && class == ThreadClass::Vmm;
                    assert!(
                        matches!(domain, Some(2) | Some(10)) || unix,
                        "{class:?}: {rule}"
                    );
                }
            }
        }
    }
}
