//! The tenant boundary, attacked: a real agent, two tenants, and a hostile
//! one that sends forged and injected fields, asks for the host's ports and
//! routes, reaches for the other tenant's resources through every endpoint,
//! runs into its quotas, and floods the DHCP server. Each check here failed
//! on the agent before #14's fixes (see SECURITY.md).
//!
//! VMs are the counting test guest (`CounterImages`): it boots in
//! milliseconds, so the suite spends its time on the boundary, not on boots.

use std::process::Command;
use std::time::{Duration, Instant};

use nubis_api::{
    Image, MigrationCreate, Network, NetworkCreate, PortForward, PortForwardCreate, Quota,
    Snapshot, SnapshotRestore, TenantCreate, TokenInfo, Vm, VmCreate, VmDisk, VmNicCreate,
};
use nubis_tests::agent::{
    assert_invalid, assert_unprocessable, counter_vm, expect, expect_as, json_body,
    one_agent_per_host, tenant, tenant_with_quota, Agent, CounterImages, OPERATOR_TOKEN,
};
use nubis_tests::netns::NetNs;
use nubis_tests::{require_kvm, TestDir};
use serde_json::{json, Value};

const OP: Option<&str> = Some(OPERATOR_TOKEN);

/// `nft list table FAMILY nubis`, which must succeed (an empty answer from a
/// failed `nft` would pass any "does not contain" check).
fn nft_table(family: &str) -> String {
    let output = Command::new("nft")
        .args(["list", "table", family, "nubis"])
        .output()
        .expect("run nft");
    assert!(
        output.status.success(),
        "nft list table {family} nubis failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The names of every nftables table on the host.
fn nft_tables() -> String {
    let output = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("run nft");
    assert!(output.status.success(), "nft list tables failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A counter VM (see [`counter_vm`]) with a NIC on network `network`.
fn vm_on(name: &str, network: &str) -> VmCreate {
    VmCreate {
        nics: vec![VmNicCreate::on_network(network)],
        ..counter_vm(name)
    }
}

#[test]
fn forged_nic_fields_and_injected_strings_never_reach_the_host() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-forged");
    let images = CounterImages::new(&dir);
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let (_, acme) = images.tenant(&agent, "acme");
    let lan = NetworkCreate::new("lan", "10.214.0.0/24");
    agent.create::<Network>("/v1/networks", &acme, &lan);
    let tables_before = nft_tables();

    // The issue's payloads: an nft script in a MAC, an address outside the
    // network, a tap naming a host interface. Each is refused by name.
    // deliberately untyped: fields the agent assigns (VmNic's) in a request
    for (nic, field) in [
        (
            json!({"network": "lan", "mac": "02:00:00:00:00:01 } } table inet x { chain y { } }"}),
            "nics[0].mac",
        ),
        (
            json!({"network": "lan", "address": "192.168.77.9/24"}),
            "nics[0].address",
        ),
        (json!({"network": "lan", "tap": "eth0"}), "nics[0].tap"),
        (
            json!({"network": "lan", "address": "10.214.0.9/24", "mac": null}),
            "nics[0].address",
        ),
    ] {
        let reply = agent.call(
            "POST",
            "/v1/vms",
            Some(&acme),
            Some(&json!({"name": "forged", "image": "counter", "memory_mib": 32, "nics": [nic]})),
        );
        assert_invalid(&reply, field);
    }

    // Script and command syntax in every string field that reaches a
    // command, a script, a path or SQL.
    let payloads = [
        "a\"; flush ruleset; \"",
        "x } } table inet x {",
        "../../../etc/shadow",
        "a\nb",
        "$(reboot)",
        "' OR 1=1 --",
    ];
    for payload in payloads {
        let vms = [
            (VmCreate::new(payload, "counter"), "name"),
            (
                VmCreate {
                    kernel_args: format!("quiet\n{payload}"),
                    ..VmCreate::new("v", "counter")
                },
                "kernel_args",
            ),
        ];
        for (body, field) in vms {
            assert_invalid(&agent.send("POST", "/v1/vms", Some(&acme), &body), field);
        }
        let networks = [
            (NetworkCreate::new(payload, "10.215.0.0/24"), "name"),
            (NetworkCreate::new("n", payload), "cidr"),
            (
                NetworkCreate {
                    dns: Some(vec![payload.to_string()]),
                    ..NetworkCreate::new("n", "10.215.0.0/24")
                },
                "dns[0]",
            ),
        ];
        for (body, field) in networks {
            let reply = agent.send("POST", "/v1/networks", Some(&acme), &body);
            assert_invalid(&reply, field);
        }
        let tenant = TenantCreate {
            name: payload.to_string(),
            quota: None,
        };
        assert_invalid(&agent.send("POST", "/v1/tenants", OP, &tenant), "name");
    }
    // An image whose name or id is a payload is simply not found.
    let reply = agent.send(
        "POST",
        "/v1/vms",
        Some(&acme),
        &VmCreate::new("v", "x' OR '1'='1"),
    );
    assert_unprocessable(&reply, "image");
    // Upload names are checked before any path is made of them.
    for name in ["..", ".hidden", "a%2Fb"] {
        let reply = agent.call("DELETE", &format!("/v1/uploads/{name}"), Some(&acme), None);
        assert!(
            matches!(reply.status, 400 | 404),
            "upload name {name}: {reply:?}"
        );
    }
    assert_eq!(nft_tables(), tables_before, "a table appeared or went");

    // The agent assigns NIC identity: inside the network, guarded by MAC.
    let vm: Vm = agent.create("/v1/vms", &acme, &vm_on("ok", "lan"));
    let mac = vm.nics[0].mac.clone().expect("a MAC");
    assert_eq!(vm.nics[0].address.as_deref(), Some("10.214.0.2/24"));
    assert!(mac.starts_with("02:4e:42:"), "{mac}");
    let bridge = nft_table("bridge");
    assert!(
        bridge.contains(&format!("ether saddr != {mac}")),
        "the NIC has no MAC guard:\n{bridge}"
    );
    assert!(bridge.contains("ip saddr != 10.214.0.2"), "{bridge}");
}

/// The host's default gateway, from `ip route`.
fn default_gateway() -> Option<std::net::Ipv4Addr> {
    let output = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|word| *word == "via")?;
    words.get(at + 1)?.parse().ok()
}

#[test]
fn tenants_get_neither_the_hosts_ports_nor_its_routes() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-ports");
    let images = CounterImages::new(&dir);
    // A link of the host's own with a network the tenant will ask for.
    let mut neighbour = NetNs::create("nbxb-routes");
    neighbour.link_to_host("nbxb0", "10.216.5.1/24", "10.216.5.2/24");
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let quota = Quota {
        max_port_forwards: 2,
        max_networks: 2,
        ..Quota::default()
    };
    let (_, acme) = tenant_with_quota(&agent, "acme", quota);
    let (_, globex) = tenant(&agent, "globex");
    images.register(&agent, &acme, "counter", None);
    let lan = NetworkCreate::new("lan", "10.217.0.0/24");
    agent.create::<Network>("/v1/networks", &acme, &lan);
    agent.create::<Vm>("/v1/vms", &acme, &vm_on("web", "lan"));

    // Port forwards: the API's port, VXLAN's, a migration port, a
    // privileged port and anything outside the range are the host's.
    let api_port = agent.address.port();
    let forward = |host_port| PortForwardCreate::new("web", host_port, 80);
    for port in [api_port, 4789, 40000, 22, 1023, 8080, 65535] {
        let reply = agent.send("POST", "/v1/port-forwards", Some(&acme), &forward(port));
        assert_unprocessable(&reply, "host_port");
    }
    for port in [30000, 39999] {
        agent.create::<PortForward>("/v1/port-forwards", &acme, &forward(port));
    }
    let over = agent.send("POST", "/v1/port-forwards", Some(&acme), &forward(31000));
    assert_eq!(
        (over.status, over.code()),
        (429, "quota_exceeded"),
        "{over:?}"
    );
    let inet = nft_table("inet");
    assert!(!inet.contains(&format!("dport {api_port} ")), "{inet}");

    // Networks: the host's routes and addresses, the default gateway,
    // link-local and loopback are not the tenant's to shadow.
    let mut shadowing = vec!["10.216.5.0/28", "169.254.169.0/24", "169.254.0.0/16"];
    let gateway_net;
    if let Some(gateway) = default_gateway() {
        let [a, b, c, d] = gateway.octets();
        gateway_net = format!("{a}.{b}.{c}.{}/29", d & !7);
        shadowing.push(&gateway_net);
    }
    for cidr in shadowing {
        let shadow = NetworkCreate::new("shadow", cidr);
        let reply = agent.send("POST", "/v1/networks", Some(&globex), &shadow);
        assert_unprocessable(&reply, "cidr");
    }
    // Another tenant's network is refused without being named.
    let clash = agent.send(
        "POST",
        "/v1/networks",
        Some(&globex),
        &NetworkCreate::new("mine", "10.217.0.0/25"),
    );
    assert_eq!(clash.status, 409, "{clash:?}");
    assert!(
        !clash.text.contains("10.217.0.0/24") && !clash.text.contains("lan"),
        "the refusal reveals acme's network: {}",
        clash.text
    );
    // The network quota.
    let two = NetworkCreate::new("two", "10.218.0.0/24");
    agent.create::<Network>("/v1/networks", &acme, &two);
    let over = agent.send(
        "POST",
        "/v1/networks",
        Some(&acme),
        &NetworkCreate::new("three", "10.219.0.0/24"),
    );
    assert_eq!(
        (over.status, over.code()),
        (429, "quota_exceeded"),
        "{over:?}"
    );
    drop(neighbour);
}

/// Every path of the OpenAPI document, tried with the other tenant's
/// token against acme's resources: operator routes are 403, acme's
/// resources are 404 (exactly as for ones that do not exist), and bodies
/// that name acme's image, network or VM are refused.
#[test]
fn every_endpoint_keeps_tenants_apart() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-tenants");
    let images = CounterImages::new(&dir);
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let (acme_id, acme) = images.tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    let image: Image = agent.get("/v1/images/counter", &acme);
    let lan = NetworkCreate::new("lan", "10.220.0.0/24");
    let network: Network = agent.create("/v1/networks", &acme, &lan);
    let vm_id = agent
        .create::<Vm>("/v1/vms", &acme, &vm_on("web", "lan"))
        .id;
    expect(
        &agent.call("POST", &format!("/v1/vms/{vm_id}/start"), Some(&acme), None),
        200,
    );
    let snapshot: Snapshot = expect_as(
        &agent.call(
            "POST",
            &format!("/v1/vms/{vm_id}/snapshots"),
            Some(&acme),
            None,
        ),
        201,
    );
    let forward: PortForward = agent.create(
        "/v1/port-forwards",
        &acme,
        &PortForwardCreate::new("web", 30080, 80),
    );
    let ssh_key = nubis_tests::agent::ssh_key(&agent, &acme, "laptop");
    let upload = nubis_tests::agent::http_raw(
        agent.address,
        "PUT",
        "/v1/uploads/acme-disk",
        Some(&acme),
        b"acme's bytes",
    );
    assert_eq!(upload.status, 201, "{upload:?}");
    let tokens: Vec<TokenInfo> =
        agent.get(&format!("/v1/tenants/{acme_id}/tokens"), OPERATOR_TOKEN);
    let token_id = tokens[0].id.clone();

    let document: Value =
        serde_json::from_str(&agent.call("GET", "/v1/openapi.json", None, None).text)
            .expect("the OpenAPI document");
    let ids = [
        ("{id}", ""),
        ("{name}", "acme-disk"),
        ("{token_id}", token_id.as_str()),
        ("{address}", "10.220.0.2"),
    ];
    let mut tried = 0;
    for (path, methods) in document["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for method in methods.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            let operator_only = path.starts_with("/v1/tenants")
                || path.starts_with("/v1/host")
                || path.starts_with("/v1/peers")
                || path.starts_with("/v1/overlay");
            // The resource the path's {id} names, acme's.
            let id = if path.starts_with("/v1/vms/") {
                vm_id.clone()
            } else if path.starts_with("/v1/images/") {
                image.id.clone()
            } else if path.starts_with("/v1/networks/") || path.starts_with("/v1/overlay/networks/")
            {
                network.id.clone()
            } else if path.starts_with("/v1/snapshots/") {
                snapshot.id.clone()
            } else if path.starts_with("/v1/port-forwards/") {
                forward.id.clone()
            } else if path.starts_with("/v1/ssh-keys/") {
                ssh_key.id.clone()
            } else if path.starts_with("/v1/tenants/") {
                acme_id.clone()
            } else if path.starts_with("/v1/overlay/migrations/") {
                vm_id.clone()
            } else {
                "acme".to_string()
            };
            let mut concrete = path.replace("{id}", &id);
            for (placeholder, value) in &ids[1..] {
                concrete = concrete.replace(placeholder, value);
            }
            let has_id = path.contains('{');
            // A body that is valid for the route, so that what answers is
            // the authorization, not the body check.
            let body = match (method.as_str(), path.as_str()) {
                ("POST", "/v1/vms/{id}/migration") => {
                    Some(json_body(&MigrationCreate::new("elsewhere")))
                }
                ("POST", "/v1/snapshots/{id}/restore") => Some(json_body(&SnapshotRestore {
                    name: "stolen".to_string(),
                })),
                ("POST", "/v1/snapshots/{id}/clones") => {
                    Some(json_body(&nubis_api::SnapshotClones {
                        count: 1,
                        name_prefix: "stolen".to_string(),
                    }))
                }
                ("POST", "/v1/services/{id}/scale") => Some(json_body(&nubis_api::RoleScale {
                    role: "web".into(),
                    instances: 1,
                })),
                ("POST", "/v1/services/{id}/upgrade") => Some(json_body(&nubis_api::RoleUpgrade {
                    role: "web".into(),
                    kernel_args: Some("stolen".into()),
                    ..Default::default()
                })),
                ("POST", "/v1/vms/{id}/exec") => Some(json_body(&nubis_api::VmExec {
                    command: "cat /etc/shadow".into(),
                    timeout_s: None,
                })),
                ("POST", "/v1/services/{id}/rollback") => {
                    Some(json_body(&nubis_api::RoleRollback { role: "web".into() }))
                }
                _ => None,
            };
            if method == "PUT" && path == "/v1/uploads/{name}" {
                // globex's own upload namespace: acme's file is untouched.
                continue;
            }
            let reply = agent.call(&method, &concrete, Some(&globex), body.as_ref());
            let expected = if operator_only {
                403
            } else if has_id {
                404
            } else {
                continue;
            };
            assert_eq!(
                reply.status, expected,
                "{method} {concrete} with another tenant's token: {reply:?}"
            );
            tried += 1;
        }
    }
    assert!(tried >= 30, "only {tried} endpoints were tried");

    // Bodies that name acme's resources.
    let on_acmes_network = VmCreate {
        nics: vec![VmNicCreate::on_network(&network.id)],
        ..VmCreate::new("x", "counter")
    };
    for body in [
        VmCreate::new("x", &image.id),
        VmCreate::new("x", "counter"),
        on_acmes_network.clone(),
    ] {
        let reply = agent.send("POST", "/v1/vms", Some(&globex), &body);
        assert_unprocessable(&reply, "image");
    }
    let acmes_vm = PortForwardCreate::new(&vm_id, 30081, 80);
    let reply = agent.send("POST", "/v1/port-forwards", Some(&globex), &acmes_vm);
    assert_unprocessable(&reply, "vm");
    let acmes_key = VmCreate {
        ssh_keys: vec![ssh_key.id.clone()],
        ..VmCreate::new("x", "counter")
    };
    let reply = agent.send("POST", "/v1/vms", Some(&globex), &acmes_key);
    assert_unprocessable(&reply, "ssh_keys[0]");
    images.register(&agent, &globex, "counter", None);
    let reply = agent.send("POST", "/v1/vms", Some(&globex), &on_acmes_network);
    assert_unprocessable(&reply, "nics[0].network");
    // Listings show globex nothing of acme's.
    for path in [
        "/v1/vms",
        "/v1/networks",
        "/v1/port-forwards",
        "/v1/snapshots",
        "/v1/uploads",
        "/v1/ssh-keys",
    ] {
        let listed: Vec<Value> = agent.get(path, &globex);
        assert!(listed.is_empty(), "{path}: {listed:?}");
    }
    let listed: Vec<Image> = agent.get("/v1/images", &globex);
    assert!(
        listed.iter().all(|image| image.tenant_id != acme_id),
        "{listed:?}"
    );
    // acme's things are all still there.
    expect(
        &agent.call("GET", &format!("/v1/vms/{vm_id}"), Some(&acme), None),
        200,
    );
    let uploads = expect(&agent.call("GET", "/v1/uploads", Some(&acme), None), 200).clone();
    assert_eq!(uploads[0]["bytes"], 12, "{uploads}");
    expect(&agent.call("GET", "/v1/tenants", OP, None), 200);
}

#[test]
fn storage_and_snapshot_quotas_hold() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-quota");
    let images = CounterImages::new(&dir);
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let quota = Quota {
        max_storage_mib: 200,
        max_snapshots: 1,
        ..Quota::default()
    };
    let (_, acme) = tenant_with_quota(&agent, "acme", quota);
    images.register(&agent, &acme, "counter", None);
    let with_disk = |name: &str, size_mib| VmCreate {
        disks: vec![VmDisk::new(size_mib)],
        ..counter_vm(name)
    };
    // 1 MiB root + 100 MiB: fits; another 100 MiB does not.
    agent.create::<Vm>("/v1/vms", &acme, &with_disk("a", 100));
    let over = agent.send("POST", "/v1/vms", Some(&acme), &with_disk("b", 100));
    assert_eq!(
        (over.status, over.code()),
        (429, "quota_exceeded"),
        "{over:?}"
    );
    // An upload may use what is left (99 MiB), not more.
    let big = vec![0u8; 100 << 20];
    let reply =
        nubis_tests::agent::http_raw(agent.address, "PUT", "/v1/uploads/big", Some(&acme), &big);
    assert_eq!(reply.status, 429, "{reply:?}");
    let listed: Vec<Value> = agent.get("/v1/uploads", &acme);
    assert!(
        listed.is_empty(),
        "a refused upload left a file: {listed:?}"
    );
    let partials = std::fs::read_dir(dir.join("agent/uploads"))
        .map(|dirs| {
            dirs.flatten()
                .flat_map(|tenant| std::fs::read_dir(tenant.path()).into_iter().flatten())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(partials, 0, "a refused upload left a partial file");
    // Snapshots: one is the quota.
    agent.create::<Vm>("/v1/vms", &acme, &counter_vm("c"));
    expect(
        &agent.call("POST", "/v1/vms/c/start", Some(&acme), None),
        200,
    );
    expect_as::<Snapshot>(
        &agent.call("POST", "/v1/vms/c/snapshots", Some(&acme), None),
        201,
    );
    let over = agent.call("POST", "/v1/vms/c/snapshots", Some(&acme), None);
    assert_eq!(
        (over.status, over.code()),
        (429, "quota_exceeded"),
        "{over:?}"
    );
    // A data disk larger than the whole quota is refused outright.
    let huge = VmCreate {
        disks: vec![VmDisk::new(16777216)],
        ..VmCreate::new("d", "counter")
    };
    let over = agent.send("POST", "/v1/vms", Some(&acme), &huge);
    assert_eq!(over.status, 429, "{over:?}");
}

/// A port on a network's bridge that floods the agent's DHCP server, as a
/// hostile guest would (made-up client MACs, as fast as it can send), while
/// the API is called: every call is answered, and the flood is dropped
/// over the rate limit instead of logged request by request. (The quick
/// check, in seconds; `agent_networks` floods from a KVM guest.)
#[test]
fn a_dhcp_flood_does_not_stall_the_api() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-dhcp");
    let images = CounterImages::new(&dir);
    let agent = Agent::start(&dir.join("agent"), &images.dir);
    let (_, acme) = tenant(&agent, "acme");
    let lan = NetworkCreate::new("lan", "10.221.0.0/24");
    let bridge = agent.create::<Network>("/v1/networks", &acme, &lan).bridge;
    // The flooder: a namespace whose veth is a port of the bridge.
    let flooder = NetNs::create("nbxb-dhcp");
    let status = Command::new("ip")
        .args([
            "link",
            "add",
            "nbxbd0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &flooder.name,
        ])
        .status()
        .expect("ip");
    assert!(status.success());
    for args in [
        vec!["link", "set", "nbxbd0", "master", &bridge],
        vec!["link", "set", "nbxbd0", "up"],
        vec!["-n", &flooder.name, "link", "set", "eth0", "up"],
    ] {
        assert!(
            Command::new("ip").args(&args).status().unwrap().success(),
            "{args:?}"
        );
    }
    // DHCPDISCOVERs with made-up MACs, broadcast, for 8 seconds.
    let script = r#"
import socket, struct, time, os
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
end = time.time() + 8
sent = 0
while time.time() < end:
    mac = os.urandom(6)
    mac = bytes([mac[0] & 0xfe]) + mac[1:]
    packet = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, sent, 0, 0x8000,
        b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"\0" * 64, b"\0" * 128)
    packet += bytes([99, 130, 83, 99, 53, 1, 1, 255])
    s.sendto(packet, ("255.255.255.255", 67))
    sent += 1
print(sent)
"#;
    let flood = flooder
        .command("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the flood");
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let reply = agent.call("GET", "/v1/networks", Some(&acme), None);
        assert_eq!(
            reply.status, 200,
            "the API failed during the flood: {reply:?}"
        );
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = flood.wait_with_output().expect("the flood");
    let sent: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(sent > 1000, "the flood sent only {sent} requests");
    assert!(
        answered > 10,
        "the API answered only {answered} calls in 7 s"
    );
    let log = agent.log();
    assert!(
        log.contains("DHCP requests over the rate limit are dropped"),
        "no rate limiting seen:\n{log}"
    );
    let per_request = log.matches("DHCP").count();
    assert!(per_request < 20, "{per_request} DHCP log lines for a flood");
    drop(flooder);
}

/// A network with NAT egress: its traffic may leave through the host, but
/// never to the underlay's network, link-local addresses or peers; the
/// rules say so, and a port on the bridge that tries is dropped while it
/// reaches the outside world. (The quick check; in `agent_networks` a KVM
/// guest tries the same.)
#[test]
fn nat_egress_reaches_the_outside_but_not_the_hosts_neighbours() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-egress");
    let images = CounterImages::new(&dir);
    // The underlay (a neighbour of the host's) and the outside world.
    let mut underlay = NetNs::create("nbxb-under");
    underlay.link_to_host("nbxbu0", "198.18.10.1/24", "198.18.10.2/24");
    let mut outside = NetNs::create("nbxb-out");
    outside.link_to_host("nbxbo0", "198.18.20.1/24", "198.18.20.2/24");
    let agent = Agent::start_with(
        &dir.join("agent"),
        &images.dir,
        &json!({"underlay_address": "198.18.10.1", "egress_deny": ["198.18.30.0/24"]}),
    );
    let (_, acme) = tenant(&agent, "acme");
    let lan = NetworkCreate {
        nat: true,
        ..NetworkCreate::new("lan", "10.222.0.0/24")
    };
    let bridge = agent.create::<Network>("/v1/networks", &acme, &lan).bridge;
    let inet = nft_table("inet");
    for denied in ["169.254.0.0/16", "198.18.10.0/24", "198.18.30.0/24"] {
        assert!(
            inet.lines()
                .any(|line| line.contains(&format!("iifname \"{bridge}\""))
                    && line.contains("ip daddr")
                    && line.contains(denied)
                    && line.contains("drop")),
            "no egress drop for {denied}:\n{inet}"
        );
    }
    // A port of the bridge standing in for a VM (10.222.0.50).
    let vm = NetNs::create("nbxb-vm");
    assert!(Command::new("ip")
        .args(["link", "add", "nbxbv0", "type", "veth", "peer", "name", "eth0", "netns", &vm.name])
        .status()
        .unwrap()
        .success());
    for args in [
        vec!["link", "set", "nbxbv0", "master", &bridge],
        vec!["link", "set", "nbxbv0", "up"],
        vec![
            "-n",
            &vm.name,
            "addr",
            "add",
            "10.222.0.50/24",
            "dev",
            "eth0",
        ],
        vec!["-n", &vm.name, "link", "set", "eth0", "up"],
        vec![
            "-n",
            &vm.name,
            "route",
            "add",
            "default",
            "via",
            "10.222.0.1",
        ],
    ] {
        assert!(
            Command::new("ip").args(&args).status().unwrap().success(),
            "{args:?}"
        );
    }
    // The outside namespace answers the host's address (masqueraded).
    outside.run("ip", &["route", "add", "default", "via", "198.18.20.1"]);
    underlay.run("ip", &["route", "add", "default", "via", "198.18.10.1"]);
    let ping = |to: &str| {
        vm.command("ping")
            .args(["-c", "2", "-w", "4", "-q", to])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("ping")
            .success()
    };
    assert!(
        ping("198.18.20.2"),
        "NAT egress to the outside world failed"
    );
    assert!(!ping("198.18.10.2"), "NAT egress reached the underlay");
    drop((vm, outside, underlay));
}

/// Whatever the quotas, the host's disk keeps its reserve: an agent that
/// must keep more free than the disk has refuses every byte a tenant asks
/// for (507), and keeps answering.
#[test]
fn the_hosts_disk_keeps_its_reserve() {
    require_kvm();
    let _host = one_agent_per_host();
    let dir = TestDir::new("boundary-reserve");
    let images = CounterImages::new(&dir);
    let agent = Agent::start_with(
        &dir.join("agent"),
        &images.dir,
        &json!({"reserved_disk_mib": 1u64 << 40}),
    );
    let (_, acme) = images.tenant(&agent, "acme");
    let vm = VmCreate {
        disks: vec![VmDisk::new(1)],
        ..counter_vm("a")
    };
    let vm = agent.send("POST", "/v1/vms", Some(&acme), &vm);
    assert_eq!((vm.status, vm.code()), (507, "host_full"), "{vm:?}");
    let upload =
        nubis_tests::agent::http_raw(agent.address, "PUT", "/v1/uploads/x", Some(&acme), b"bytes");
    assert_eq!(
        (upload.status, upload.code()),
        (507, "host_full"),
        "{upload:?}"
    );
    expect(&agent.call("GET", "/v1/vms", Some(&acme), None), 200);
}
