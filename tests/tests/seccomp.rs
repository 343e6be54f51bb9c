//! The VMM's system-call filters: a thread of each class that makes a call
//! outside its list kills the whole process with SIGSYS. The call is made
//! by a trigger that only debug builds have (NUBIS_SECCOMP_TEST_TRIGGER,
//! see vmm/src/seccomp.rs); without the filters (`--no-seccomp`) the same
//! call is harmless and the VM runs on, so each check can fail.

use std::process::Command;
use std::time::Duration;

use nubis_tests::guest::Program;
use nubis_tests::vm::{control_request, VmProcess};
use nubis_tests::{require_kvm, vmm_binary, TestDir};

/// Hang guard, not a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

fn vmm(dir: &TestDir, trigger: &str, filtered: bool) -> VmProcess {
    let kernel = dir.join("count.elf");
    Program::new().count(20_000).write(&kernel);
    let socket = dir.join("control.sock");
    let mut command = Command::new(vmm_binary());
    command
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32", "--serial", "off", "--control-socket"])
        .arg(&socket)
        .env("NUBIS_SECCOMP_TEST_TRIGGER", trigger);
    if !filtered {
        command.arg("--no-seccomp");
    }
    VmProcess::spawn_command(command)
}

#[test]
fn a_forbidden_call_on_any_thread_kills_the_vmm() {
    require_kvm();
    for class in ["vmm", "vcpu", "migration"] {
        for filtered in [true, false] {
            let dir = TestDir::new(&format!("seccomp-{class}-{filtered}"));
            let mut vm = vmm(&dir, class, filtered);
            if class != "migration" {
                assert!(
                    vm.wait_for_log("seccomp test trigger", WAIT),
                    "{class}: the trigger never ran:\n{}",
                    vm.stderr()
                );
            }
            if class == "migration" {
                // The migration thread starts with a migration (to a port
                // nobody listens on: it fails after the trigger).
                let socket = dir.join("control.sock");
                let answer = control_request(
                    &socket,
                    r#"{"command":"migrate","to":"127.0.0.1:9","token":"0123456789abcdef0123","key":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}"#,
                );
                assert_eq!(answer["ok"], true, "{answer}");
                assert!(
                    vm.wait_for_log("seccomp test trigger", WAIT),
                    "the migration thread's trigger never ran:\n{}",
                    vm.stderr()
                );
            }
            if filtered {
                let outcome = vm.wait(WAIT);
                assert_eq!(
                    outcome.signal,
                    Some(libc::SIGSYS),
                    "{class}: the forbidden call did not kill the VMM: {outcome:?}"
                );
            } else {
                // Unfiltered, the call returns and the VM still answers.
                assert!(
                    vm.wait_for_log("the forbidden call returned", WAIT),
                    "{class}: {}",
                    vm.stderr()
                );
                let status = control_request(&dir.join("control.sock"), r#"{"command":"status"}"#);
                assert_eq!(status["status"]["state"], "running", "{class}: {status}");
                vm.signal(libc::SIGTERM);
                let outcome = vm.wait(WAIT);
                assert_eq!(outcome.code, Some(0), "{class}: {outcome:?}");
            }
        }
    }
}
