//! The `nubis-vmm` command line itself. (Having an integration test here
//! also makes `cargo test --workspace` build the binary that the end-to-end
//! tests in `tests/` run.)

use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nubis-vmm"))
}

#[test]
fn help_names_every_flag() {
    let output = vmm().arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--config",
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory-mib",
        "--serial",
        "--disk",
        "--rng",
        "--control-socket",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn version_is_printed() {
    let output = vmm().arg("--version").output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("nubis-vmm "));
}
