//! The agent's programs' command lines. (An integration test in this
//! package also makes `cargo test --workspace` build `nubis-agent` and
//! `nubisctl`, which the end-to-end tests in `tests/` run: without one,
//! a fresh checkout's test run finds neither binary.)

use std::process::Command;

#[test]
fn agent_help_names_every_flag() {
    let output = Command::new(env!("CARGO_BIN_EXE_nubis-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--listen", "--data-dir", "--config", "--openapi"] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn agent_without_listen_is_refused_with_one_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_nubis-agent"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--listen"));
}

#[test]
fn nubisctl_version_is_printed() {
    let output = Command::new(env!("CARGO_BIN_EXE_nubisctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("nubisctl "));
}

#[test]
fn nubisctl_reports_an_agent_it_cannot_reach() {
    // Port 1 on loopback: nothing listens. The client must set up (its
    // TLS provider included) and fail with a message, not a panic.
    let output = Command::new(env!("CARGO_BIN_EXE_nubisctl"))
        .args([
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "x",
            "tenant",
            "list",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn agent_help_names_the_cluster_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_nubis-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--cluster",
        "--host-name",
        "--labels",
        "--roles",
        "--lease-ttl",
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn agent_refuses_bad_cluster_settings_before_touching_anything() {
    let dir = std::env::temp_dir().join(format!("nubis-cli-cluster-{}", std::process::id()));
    for (args, expected) in [
        (
            vec!["--cluster", "etcd=10.0.0.1:2379", "--host-name", "a"],
            "is not http://HOST:PORT",
        ),
        (
            vec![
                "--cluster",
                "etcd=http://10.0.0.1:2379",
                "--host-name",
                "Host_A",
            ],
            "host name 'Host_A'",
        ),
        (
            vec![
                "--cluster",
                "etcd=http://10.0.0.1:2379",
                "--host-name",
                "a",
                "--labels",
                "zone=a b",
            ],
            "label value",
        ),
        (
            vec![
                "--cluster",
                "etcd=http://10.0.0.1:2379",
                "--host-name",
                "a",
                "--roles",
                "storage",
            ],
            "role 'storage'",
        ),
        (
            vec![
                "--cluster",
                "etcd=https://10.0.0.1:2379",
                "--host-name",
                "a",
                "--etcd-ca",
                "/nonexistent/ca.pem",
            ],
            "etcd TLS needs all of ca, cert and key",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_nubis-agent"))
            .args(["--listen", "127.0.0.1:1", "--data-dir"])
            .arg(&dir)
            .args(&args)
            .env("NUBIS_OPERATOR_TOKEN", "cli-test-operator-token-0000")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!dir.exists(), "{args:?} created the data directory");
    }
}
