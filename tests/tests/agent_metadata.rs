//! The instance metadata service end to end: a real agent, two real
//! guests on two networks. Each guest's first-boot step (the Nubis
//! images' `nubis-guest-agent`) reads its own hostname, SSH key and user
//! data with an IMDSv2 token and runs the user-data script; without a
//! token, with another VM's token, through a relaying proxy or from the
//! host itself nothing is answered.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nubis_api::{
    Image, ImageCreate, NetworkCreate, SshKey, SshKeyCreate, Vm, VmCreate, VmNicCreate,
};
use nubis_tests::agent::{
    assert_invalid, assert_unprocessable, exec_stdout, host_path, keyed_value, tenant,
    wait_for_console, Agent,
};
use nubis_tests::{guest_images, require_kvm, TestDir};

use nubis_tests::agent::TEST_SSH_KEY as KEY;

/// The user data: a script the first boot runs once.
const USER_DATA: &str =
    "#!/bin/sh\necho \"user-data ran as uid $(id -u)\" > /var/lib/nubis/proof\n";

/// A shell function for the guests: `imds METHOD PATH [HEADER]` sends one
/// HTTP/1.0 request to the metadata service and prints the answer's
/// status line and body.
const IMDS: &str = r#"imds() { printf "$1 $2 HTTP/1.0\r\n${3:+$3\r\n}\r\n" | nc 169.254.169.254 80 | sed -n '1p;$p' | tr -d '\r' | tr '\n' '|'; echo; }"#;

#[test]
fn guests_read_only_their_own_metadata_and_only_with_a_token() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let images = guest_images();
    let dir = TestDir::new("agent-metadata");
    let data_dir = dir.join("agent");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let agent = Agent::start(&data_dir, &image_dir);
    let (_, acme) = tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    // The root disk is writable: the first boot writes the keys, the
    // hostname and the user data's proof there.
    let image = agent
        .create::<Image>(
            "/v1/images",
            &acme,
            &ImageCreate {
                name: "busybox".into(),
                kernel: host_path(&images.vmlinux),
                rootfs: host_path(&images.rootfs),
                initrd: None,
                cmdline: format!(
                    "{} root=/dev/vda rw nubis_cmd=\"echo META_VM_UP; read wait_forever\"",
                    images.cmdline
                ),
            },
        )
        .id;

    // SSH keys: parsed, fingerprinted, the tenant's own.
    let key: SshKey = agent.create(
        "/v1/ssh-keys",
        &acme,
        &SshKeyCreate {
            name: "laptop".into(),
            public_key: format!("  {KEY}  "),
        },
    );
    assert_eq!(key.public_key, KEY);
    assert!(key.fingerprint.starts_with("SHA256:"), "{key:?}");
    let bad = agent.send(
        "POST",
        "/v1/ssh-keys",
        Some(&acme),
        &SshKeyCreate {
            name: "bad".into(),
            public_key:
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g"
                    .into(),
        },
    );
    // Shaped like a key, but its data is an ed25519 key's.
    assert_unprocessable(&bad, "public_key");
    let garbled = agent.send(
        "POST",
        "/v1/ssh-keys",
        Some(&acme),
        &SshKeyCreate {
            name: "bad".into(),
            public_key: "ssh-dss AAAA".into(),
        },
    );
    assert_invalid(&garbled, "public_key");
    let foreign = agent.call(
        "GET",
        &format!("/v1/ssh-keys/{}", key.id),
        Some(&globex),
        None,
    );
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let borrowed = agent.send(
        "POST",
        "/v1/vms",
        Some(&globex),
        &VmCreate {
            ssh_keys: vec![key.id.clone()],
            ..VmCreate::new("thief", "busybox")
        },
    );
    assert_eq!(borrowed.status, 422, "{borrowed:?}");
    let bad_data = agent.send(
        "POST",
        "/v1/vms",
        Some(&acme),
        &VmCreate {
            user_data: Some("not base64!".into()),
            ..VmCreate::new("bad", &image)
        },
    );
    assert_invalid(&bad_data, "user_data");
    let unknown_key = agent.send(
        "POST",
        "/v1/vms",
        Some(&acme),
        &VmCreate {
            ssh_keys: vec!["desktop".into()],
            ..VmCreate::new("bad", &image)
        },
    );
    assert_unprocessable(&unknown_key, "ssh_keys[0]");

    // meta-a: on the tenant's bridge, with the key, a tag and user data;
    // meta-b: on a network of its own, with none of them.
    use base64::Engine as _;
    let a: Vm = agent.create(
        "/v1/vms",
        &acme,
        &VmCreate {
            ssh_keys: vec!["laptop".into()],
            tags: [("env".to_string(), "test".to_string())].into(),
            user_data: Some(base64::engine::general_purpose::STANDARD.encode(USER_DATA)),
            nics: vec![VmNicCreate::default()],
            start: true,
            ..VmCreate::new("meta-a", &image)
        },
    );
    assert_eq!(a.ssh_keys, ["laptop"]);
    assert_eq!(a.tags["env"], "test");
    assert_eq!(a.user_data_bytes, Some(USER_DATA.len() as u64));
    agent.create::<nubis_api::Network>(
        "/v1/networks",
        &acme,
        &NetworkCreate::new("back", "10.79.0.0/24"),
    );
    let b: Vm = agent.create(
        "/v1/vms",
        &acme,
        &VmCreate {
            nics: vec![VmNicCreate::on_network("back")],
            start: true,
            ..VmCreate::new("meta-b", &image)
        },
    );
    // A key deleted now stays with the VM created with it.
    let deleted = agent.call("DELETE", "/v1/ssh-keys/laptop", Some(&acme), None);
    assert_eq!(deleted.status, 204, "{deleted:?}");

    let console = wait_for_console(&agent, &acme, &a.id, "nubis-metadata: hostname meta-a");
    assert!(
        console.contains("nubis-metadata: hostname meta-a, 1 ssh keys, user-data ran"),
        "{console}"
    );
    let console = wait_for_console(&agent, &acme, &b.id, "nubis-metadata: hostname meta-b");
    assert!(
        console.contains("nubis-metadata: hostname meta-b, 0 ssh keys, user-data none"),
        "{console}"
    );

    // meta-a: what its first boot applied, and the service's answers.
    let out = exec_stdout(
        &agent,
        &acme,
        &a.id,
        &format!(
            r#"{IMDS}
echo KEYS=$(cat /root/.ssh/authorized_keys)
echo HOSTNAME=$(hostname)
echo PROOF=$(cat /var/lib/nubis/proof)
echo NOTOKEN=$(imds GET /latest/meta-data/instance-id)
T=$(imds PUT /latest/api/token 'X-aws-ec2-metadata-token-ttl-seconds: 300' | cut -d'|' -f2)
echo TOKEN=$T
echo ID=$(imds GET /latest/meta-data/instance-id "X-aws-ec2-metadata-token: $T")
echo TAG=$(imds GET /latest/meta-data/tags/instance/env "X-aws-ec2-metadata-token: $T")
echo PROXIED=$(printf 'PUT /latest/api/token HTTP/1.0\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n' | nc 169.254.169.254 80 | head -1 | tr -d '\r')"#
        ),
    );
    assert_eq!(keyed_value(&out, "KEYS"), KEY, "{out}");
    assert_eq!(keyed_value(&out, "HOSTNAME"), "meta-a", "{out}");
    assert_eq!(
        keyed_value(&out, "PROOF"),
        "user-data ran as uid 0",
        "{out}"
    );
    assert!(
        keyed_value(&out, "NOTOKEN").starts_with("HTTP/1.0 401"),
        "{out}"
    );
    let token_a = keyed_value(&out, "TOKEN");
    assert_eq!(token_a.len(), 64, "{out}");
    assert_eq!(
        keyed_value(&out, "ID"),
        format!("HTTP/1.0 200 OK|{}|", a.id),
        "{out}"
    );
    assert_eq!(keyed_value(&out, "TAG"), "HTTP/1.0 200 OK|test|", "{out}");
    assert!(
        keyed_value(&out, "PROXIED").starts_with("HTTP/1.0 403"),
        "{out}"
    );

    // meta-b: its own answers; meta-a's token is nothing to it.
    let out = exec_stdout(
        &agent,
        &acme,
        &b.id,
        &format!(
            r#"{IMDS}
R=$(imds PUT /latest/api/token 'X-aws-ec2-metadata-token-ttl-seconds: 300')
echo PUT=$R
T=$(echo "$R" | cut -d'|' -f2)
echo HOSTNAME=$(imds GET /latest/meta-data/hostname "X-aws-ec2-metadata-token: $T")
echo KEYS=$(imds GET /latest/meta-data/public-keys/ "X-aws-ec2-metadata-token: $T")
echo USERDATA=$(imds GET /latest/user-data "X-aws-ec2-metadata-token: $T")
echo STOLEN=$(imds GET /latest/meta-data/instance-id "X-aws-ec2-metadata-token: {token_a}")"#
        ),
    );
    assert!(
        keyed_value(&out, "PUT").starts_with("HTTP/1.0 200 OK|"),
        "meta-b's token request: {out}"
    );
    assert_eq!(
        keyed_value(&out, "HOSTNAME"),
        "HTTP/1.0 200 OK|meta-b|",
        "{out}"
    );
    assert!(
        keyed_value(&out, "KEYS").starts_with("HTTP/1.0 404"),
        "{out}"
    );
    assert!(
        keyed_value(&out, "USERDATA").starts_with("HTTP/1.0 404"),
        "{out}"
    );
    assert!(
        keyed_value(&out, "STOLEN").starts_with("HTTP/1.0 401"),
        "{out}"
    );

    // The host's own processes do not reach the listener: only VMs do,
    // through the rules' DNAT.
    let log = agent.log();
    let port: u16 = log
        .lines()
        .find_map(|line| {
            line.split("metadata service listening for VMs on port ")
                .nth(1)
        })
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metadata port in the agent's log:\n{log}"));
    let direct = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    );
    assert!(direct.is_err(), "the host reached the metadata port {port}");

    for vm in [&a.id, &b.id] {
        let stopped = agent.call(
            "POST",
            &format!("/v1/vms/{vm}/force-stop"),
            Some(&acme),
            None,
        );
        assert_eq!(stopped.status, 200, "{stopped:?}");
        let deleted = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
        assert_eq!(deleted.status, 204, "{deleted:?}");
    }
}
