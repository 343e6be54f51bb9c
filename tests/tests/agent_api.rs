//! The host agent end to end: a real `nubis-agent` over real HTTP, with
//! real VMs booted by real `nubis-vmm` processes.

use std::time::{Duration, Instant};

use nubis_api::{
    Image, ImageCreate, Network, NetworkCreate, PortForward, PortForwardCreate, Protocol, Quota,
    RateLimit, TenantCreate, Vm, VmCreate, VmDisk, VmNicCreate, VmState,
};
use nubis_tests::agent::{
    assert_invalid, assert_unprocessable, expect, expect_as, host_path, tenant, tenant_with_quota,
    wait_for_console, Agent, Reply, BOOT_GUARD, OPERATOR_TOKEN,
};
use nubis_tests::net::links_with_prefix;
use nubis_tests::{guest_images, require_kvm, TestDir};
use serde_json::{json, Value};

const OP: Option<&str> = Some(OPERATOR_TOKEN);

/// Registers the test guest image as "busybox", its root read-only and
/// `command` its init's command: its id.
fn register_image(agent: &Agent, token: &str, command: &str) -> String {
    let images = guest_images();
    let body = ImageCreate {
        name: "busybox".to_string(),
        kernel: host_path(&images.vmlinux),
        rootfs: host_path(&images.rootfs),
        initrd: None,
        cmdline: format!(
            "{} root=/dev/vda ro nubis_cmd=\"{command}\"",
            images.cmdline
        ),
    };
    agent.create::<Image>("/v1/images", token, &body).id
}

/// Each of `requests` (method, path) is a 404 `not_found` for `token`, as
/// another tenant's resources are.
fn assert_hidden(agent: &Agent, token: &str, requests: &[(&str, String)]) {
    for (method, path) in requests {
        let reply = agent.call(method, path, Some(token), None);
        assert_eq!(
            (reply.status, reply.code()),
            (404, "not_found"),
            "{method} {path}: {reply:?}"
        );
    }
}

fn vmm_running(data_dir: &std::path::Path, vm: &str) -> bool {
    nubis_tests::agent::vmm_pid(data_dir, vm).is_some()
}

/// Two VMs boot at once through the API; the agent is killed with SIGKILL
/// and restarted, adopts the running VMMs, then stops and deletes them:
/// nothing is left behind.
#[test]
fn vms_boot_through_the_api_and_survive_an_agent_crash() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let images = guest_images();
    let dir = TestDir::new("agent-e2e");
    let data_dir = dir.join("agent");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let mut agent = Agent::start(&data_dir, &image_dir);
    let (acme_id, acme) = tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    let image = register_image(&agent, &acme, "echo AGENT_VM_UP; read wait_forever");

    // web's NIC goes on the tenant's default bridge, db's on a network.
    let back: Network = agent.create(
        "/v1/networks",
        &acme,
        &NetworkCreate::new("back", "10.77.0.0/24"),
    );
    let mut vms = Vec::new();
    let mut addresses = Vec::new();
    for (name, nic) in [
        ("web", VmNicCreate::default()),
        ("db", VmNicCreate::on_network("back")),
    ] {
        let body = VmCreate {
            memory_mib: 128,
            disks: vec![VmDisk {
                size_mib: 16,
                rate_limit: RateLimit {
                    bytes_per_s: Some(10485760),
                    ops_per_s: None,
                },
            }],
            nics: vec![nic],
            ..VmCreate::new(name, &image)
        };
        let vm: Vm = agent.create("/v1/vms", &acme, &body);
        assert_eq!(vm.state, VmState::Stopped);
        let nic = &vm.nics[0];
        let mac = nic.mac.as_deref().unwrap_or("");
        assert!(mac.starts_with("02:4e:42:"), "{vm:?}");
        let address = nic
            .address
            .as_deref()
            .expect("an address")
            .trim_end_matches("/24")
            .to_string();
        if name == "db" {
            assert_eq!(address, "10.77.0.2", "db's address comes from its network");
            assert_eq!(nic.network, Some(back.id.clone()));
        }
        assert!(!addresses.contains(&address), "two NICs got {address}");
        addresses.push(address);
        vms.push(vm.id);
    }
    // Both start at once: requests on different VMs run in parallel; two
    // starts of the same VM are serialized, and the second finds it running.
    let starts: Vec<_> = [&vms[0], &vms[1], &vms[1]]
        .iter()
        .map(|vm| {
            let (address, token, path) =
                (agent.address, acme.clone(), format!("/v1/vms/{vm}/start"));
            std::thread::spawn(move || {
                nubis_tests::agent::http(address, "POST", &path, Some(&token), None)
            })
        })
        .collect();
    let replies: Vec<Reply> = starts
        .into_iter()
        .map(|start| start.join().unwrap())
        .collect();
    assert_eq!(expect(&replies[0], 200)["state"], "running");
    let mut db_statuses = [replies[1].status, replies[2].status];
    db_statuses.sort();
    assert_eq!(db_statuses, [200, 409], "{replies:?}");
    for vm in &vms {
        wait_for_console(&agent, &acme, vm, "\nAGENT_VM_UP");
    }
    // Each guest has its agent-assigned address on the tenant's bridge.
    for address in &addresses {
        assert!(
            nubis_tests::net::host_ping(address, 3),
            "the host cannot ping the guest at {address}"
        );
    }
    let web_tap = format!("nbt{}0", &vms[0][3..11]);
    assert!(link_exists(&web_tap), "no tap {web_tap}");
    // Metrics: VMs by state, API latency, and each VMM's device counters.
    let metrics = agent.call("GET", "/metrics", OP, None);
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics.text.contains("nubis_vms{state=\"running\"} 2"),
        "{}",
        metrics.text
    );
    assert!(metrics.text.contains("nubis_api_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/vms/{id}/start\""), "{}", metrics.text);
    let root_reads = metrics
        .text
        .lines()
        .find(|line| {
            line.contains(&format!("vm=\"{}\"", vms[0]))
                && line.contains("device=\"root\",counter=\"read_bytes\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no root read_bytes for {}:\n{}", vms[0], metrics.text));
    assert!(root_reads > 0, "the guest booted from a disk it never read");
    assert!(
        metrics.text.contains("counter=\"rx_frames\""),
        "{}",
        metrics.text
    );
    assert_eq!(agent.call("GET", "/metrics", Some(&acme), None).status, 403);
    let web = &vms[0];
    let before = agent.call("GET", &format!("/v1/vms/{web}"), Some(&acme), None);
    let pid = expect(&before, 200)["pid"]
        .as_u64()
        .expect("a running VM has a pid");
    // Another tenant sees nothing of it.
    assert_hidden(
        &agent,
        &globex,
        &[
            ("GET", format!("/v1/vms/{web}")),
            ("POST", format!("/v1/vms/{web}/stop")),
            ("GET", format!("/v1/vms/{web}/console")),
            ("DELETE", format!("/v1/vms/{web}")),
        ],
    );
    assert_eq!(agent.get::<Vec<Vm>>("/v1/vms", &globex), []);
    // A VM that runs cannot be started again.
    let again = agent.call("POST", &format!("/v1/vms/{web}/start"), Some(&acme), None);
    assert_eq!((again.status, again.code()), (409, "conflict"));

    // The agent crashes; a new one adopts the VMMs that still run.
    agent.kill();
    assert!(vmm_running(&data_dir, web), "the VMM died with the agent");
    // While no agent watches, db's VMM dies.
    let db = &vms[1];
    let db_pid = nubis_tests::agent::vmm_pid(&data_dir, db).expect("db's VMM runs");
    // SAFETY: kill with the pid of db's VMM, found by its cgroup.
    unsafe { libc::kill(db_pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while vmm_running(&data_dir, db) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = Agent::start(&data_dir, &image_dir);
    let db_after = agent.call("GET", &format!("/v1/vms/{db}"), Some(&acme), None);
    let db_after = expect(&db_after, 200);
    assert_eq!(db_after["state"], "failed", "{db_after}");
    assert!(
        db_after["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("while the agent was down"),
        "{db_after}"
    );
    assert!(
        !link_exists(&format!("nbt{}0", &db[3..11])),
        "the dead VM's tap was left behind"
    );
    let after = agent.call("GET", &format!("/v1/vms/{web}"), Some(&acme), None);
    let after = expect(&after, 200);
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["pid"].as_u64(), Some(pid));
    let events = agent.call("GET", &format!("/v1/vms/{web}/events"), Some(&acme), None);
    assert!(
        expect(&events, 200)
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "adopted"),
        "{events:?}"
    );
    // The guest agent runs a command over vsock (through the adopted
    // VMM's device): its output and status stream back; another tenant's
    // request finds nothing.
    let exec = nubis_api::VmExec {
        command: "echo out; echo err >&2; exit 3".into(),
        timeout_s: Some(60),
    };
    let ran = agent.send("POST", &format!("/v1/vms/{web}/exec"), Some(&acme), &exec);
    assert_eq!(ran.status, 200, "{ran:?}");
    let events: Vec<nubis_api::ExecEvent> = ran
        .text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line}: {err}")))
        .collect();
    assert_eq!(
        events,
        [
            nubis_api::ExecEvent::Stdout {
                data: "out\n".into()
            },
            nubis_api::ExecEvent::Stderr {
                data: "err\n".into()
            },
            nubis_api::ExecEvent::Exit { code: 3 },
        ],
        "{}",
        ran.text
    );
    let foreign = agent.send("POST", &format!("/v1/vms/{web}/exec"), Some(&globex), &exec);
    assert_eq!(foreign.status, 404, "{foreign:?}");
    // Pause and resume go through the VMM's control socket.
    let paused = agent.call("POST", &format!("/v1/vms/{web}/pause"), Some(&acme), None);
    assert_eq!(expect(&paused, 200)["state"], "paused");
    let resumed = agent.call("POST", &format!("/v1/vms/{web}/resume"), Some(&acme), None);
    assert_eq!(expect(&resumed, 200)["state"], "running");
    // Reboot: a graceful stop and a new VMM; the guest's init runs again.
    let rebooted = agent.call("POST", &format!("/v1/vms/{web}/reboot"), Some(&acme), None);
    let rebooted = expect(&rebooted, 200);
    assert_eq!(rebooted["state"], "running", "{rebooted}");
    assert_ne!(
        rebooted["pid"].as_u64(),
        Some(pid),
        "the same VMM after a reboot"
    );
    let start = Instant::now();
    while wait_for_console(&agent, &acme, web, "\nAGENT_VM_UP")
        .matches("\nAGENT_VM_UP")
        .count()
        < 2
    {
        assert!(start.elapsed() < BOOT_GUARD, "the guest did not boot again");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Graceful stop: Ctrl-Alt-Del, the guest restarts, the VMM exits 0.
    let stopped = agent.call("POST", &format!("/v1/vms/{web}/stop"), Some(&acme), None);
    let stopped = expect(&stopped, 200);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped.get("pid").is_none(), "{stopped}");
    assert!(
        !vmm_running(&data_dir, web),
        "the VMM still runs after stop"
    );
    assert!(!link_exists(&web_tap), "the tap outlived the VM's stop");
    let exec = nubis_api::VmExec {
        command: "true".into(),
        timeout_s: None,
    };
    let refused = agent.send("POST", &format!("/v1/vms/{web}/exec"), Some(&acme), &exec);
    assert_eq!((refused.status, refused.code()), (409, "conflict"));
    // The streaming console of a stopped VM returns what there is and ends.
    let followed = agent.call(
        "GET",
        &format!("/v1/vms/{web}/console?follow=true"),
        Some(&acme),
        None,
    );
    assert_eq!(followed.status, 200);
    assert_eq!(
        followed.text.matches("\nAGENT_VM_UP").count(),
        2,
        "{}",
        followed.text
    );
    let tail = agent.call(
        "GET",
        &format!("/v1/vms/{web}/console?offset=100"),
        Some(&acme),
        None,
    );
    let next: u64 = tail.header("x-console-offset").unwrap().parse().unwrap();
    assert_eq!(
        next as usize,
        followed.text.len(),
        "the next offset is the log's end"
    );
    // Deleting the running one stops it too; nothing is left behind.
    for vm in &vms {
        let reply = agent.call("DELETE", &format!("/v1/vms/{vm}"), Some(&acme), None);
        assert_eq!(reply.status, 204, "{reply:?}");
        assert!(
            !data_dir.join("vms").join(vm).exists(),
            "files of {vm} remain"
        );
        assert!(!vmm_running(&data_dir, vm));
    }
    assert_eq!(agent.get::<Vec<Vm>>("/v1/vms", &acme), []);
    assert_eq!(
        agent
            .call("DELETE", &format!("/v1/images/{image}"), Some(&acme), None)
            .status,
        204
    );
    let network_bridge = format!("nbn{}", back.vni);
    assert!(link_exists(&network_bridge), "no bridge {network_bridge}");
    let back_id = &back.id;
    assert_eq!(
        agent
            .call(
                "DELETE",
                &format!("/v1/networks/{back_id}"),
                Some(&acme),
                None
            )
            .status,
        204
    );
    assert!(
        !link_exists(&network_bridge),
        "the network's bridge remains"
    );
    let bridges_before = links_with_prefix("nbr");
    assert_eq!(
        agent
            .call("DELETE", &format!("/v1/tenants/{acme_id}"), OP, None)
            .status,
        204
    );
    assert_eq!(
        links_with_prefix("nbr").len() + 1,
        bridges_before.len(),
        "the tenant's bridge remains: {:?}",
        links_with_prefix("nbr")
    );
    assert!(links_with_prefix(&format!("nbt{}", &vms[1][3..11])).is_empty());
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Every endpoint with no token, a wrong token, a tenant token where the
/// operator's is needed, and another tenant's token; bad input on the
/// fields; quotas.
#[test]
fn authorization_bad_input_and_quotas() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let images = guest_images();
    let dir = TestDir::new("agent-auth");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let agent = Agent::start(&dir.join("agent"), &image_dir);
    let (acme_id, acme) = tenant(&agent, "acme");
    let (_, globex) = tenant(&agent, "globex");
    let image = register_image(&agent, &acme, "true");
    let vm = agent
        .create::<Vm>("/v1/vms", &acme, &VmCreate::new("web", "busybox"))
        .id;

    let operator_only = [
        ("GET", "/v1/tenants".to_string()),
        ("POST", "/v1/tenants".to_string()),
        ("GET", format!("/v1/tenants/{acme_id}")),
        ("DELETE", format!("/v1/tenants/{acme_id}")),
        ("POST", format!("/v1/tenants/{acme_id}/tokens")),
        ("GET", format!("/v1/tenants/{acme_id}/tokens")),
    ];
    let tenant_resources = [
        ("GET", format!("/v1/images/{image}")),
        ("DELETE", format!("/v1/images/{image}")),
        ("GET", format!("/v1/vms/{vm}")),
        ("DELETE", format!("/v1/vms/{vm}")),
        ("POST", format!("/v1/vms/{vm}/start")),
        ("POST", format!("/v1/vms/{vm}/stop")),
        ("POST", format!("/v1/vms/{vm}/force-stop")),
        ("POST", format!("/v1/vms/{vm}/reboot")),
        ("POST", format!("/v1/vms/{vm}/pause")),
        ("POST", format!("/v1/vms/{vm}/resume")),
        ("GET", format!("/v1/vms/{vm}/console")),
        ("GET", format!("/v1/vms/{vm}/events")),
    ];
    let collections = [
        ("GET", "/v1/images".to_string()),
        ("GET", "/v1/vms".to_string()),
    ];
    for (method, path) in operator_only
        .iter()
        .chain(&tenant_resources)
        .chain(&collections)
    {
        let none = agent.call(method, path, None, None);
        assert_eq!(
            (none.status, none.code()),
            (401, "unauthorized"),
            "{method} {path} without a token"
        );
        let wrong = agent.call(method, path, Some("nbs_not-a-token"), None);
        assert_eq!(
            (wrong.status, wrong.code()),
            (401, "unauthorized"),
            "{method} {path} with a wrong token"
        );
    }
    let tenant_x = TenantCreate {
        name: "x".to_string(),
        quota: None,
    };
    for (method, path) in &operator_only {
        let reply = agent.send(method, path, Some(&acme), &tenant_x);
        assert_eq!(
            (reply.status, reply.code()),
            (403, "forbidden"),
            "{method} {path} as a tenant"
        );
    }
    assert_hidden(&agent, &globex, &tenant_resources);
    // The operator sees every tenant's VMs.
    assert_eq!(
        expect(&agent.call("GET", "/v1/vms", OP, None), 200)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(agent.call("GET", "/healthz", None, None).status, 200);
    // The OpenAPI document is served as checked in.
    let document = agent.call("GET", "/v1/openapi.json", None, None);
    assert!(expect(&document, 200)["paths"]["/v1/vms/{id}/start"].is_object());
    let checked_in =
        std::fs::read_to_string(nubis_tests::workspace_root().join("api/openapi.json")).unwrap();
    assert_eq!(document.text, checked_in);

    // Bad input: 400 with the field named, never a 500.
    let new_tenant = |name: &str, quota: Option<Quota>| TenantCreate {
        name: name.to_string(),
        quota,
    };
    let bad_name = new_tenant("Bad Name", None);
    assert_invalid(&agent.send("POST", "/v1/tenants", OP, &bad_name), "name");
    let no_vcpus = Quota {
        max_vcpus: 0,
        max_memory_mib: 1,
        max_vms: 1,
        ..Quota::default()
    };
    let no_vcpus = new_tenant("ok", Some(no_vcpus));
    assert_invalid(&agent.send("POST", "/v1/tenants", OP, &no_vcpus), "quota");
    // deliberately untyped: an unknown field
    let colour = json!({"name": "ok", "colour": "red"});
    assert_invalid(
        &agent.call("POST", "/v1/tenants", OP, Some(&colour)),
        "colour",
    );
    // deliberately untyped: the required name is missing
    let nameless = json!({});
    assert_invalid(
        &agent.call("POST", "/v1/tenants", OP, Some(&nameless)),
        "name",
    );
    let bad_vm = |body: &VmCreate, field: &str| {
        assert_invalid(&agent.send("POST", "/v1/vms", Some(&acme), body), field);
    };
    let db = || VmCreate::new("db", "busybox");
    bad_vm(&VmCreate { vcpus: 0, ..db() }, "vcpus");
    bad_vm(
        &VmCreate {
            memory_mib: 1,
            ..db()
        },
        "memory_mib",
    );
    bad_vm(&VmCreate::new("-x", "busybox"), "name");
    bad_vm(
        &VmCreate {
            kernel_args: "a\nb".to_string(),
            ..db()
        },
        "kernel_args",
    );
    bad_vm(
        &VmCreate {
            disks: vec![VmDisk::new(0)],
            ..db()
        },
        "disks[0].size_mib",
    );
    let no_ops = VmDisk {
        size_mib: 1,
        rate_limit: RateLimit {
            bytes_per_s: None,
            ops_per_s: Some(0),
        },
    };
    bad_vm(
        &VmCreate {
            disks: vec![no_ops],
            ..db()
        },
        "disks[0].rate_limit",
    );
    // deliberately untyped: an unknown field
    let cpus = json!({"name": "db", "image": "busybox", "cpus": 2});
    assert_invalid(
        &agent.call("POST", "/v1/vms", Some(&acme), Some(&cpus)),
        "cpus",
    );
    let image_of = |kernel: String| ImageCreate {
        name: "x".to_string(),
        kernel,
        rootfs: host_path(&images.rootfs),
        initrd: None,
        cmdline: String::new(),
    };
    let relative = image_of("relative/vmlinux".to_string());
    assert_invalid(
        &agent.send("POST", "/v1/images", Some(&acme), &relative),
        "kernel",
    );
    // Valid by the document, but naming what the tenant has not or may
    // not use: 422 with the field named.
    let nope = VmCreate::new("db", "nope");
    assert_unprocessable(&agent.send("POST", "/v1/vms", Some(&acme), &nope), "image");
    let passwd = image_of("/etc/passwd".to_string());
    assert_unprocessable(
        &agent.send("POST", "/v1/images", Some(&acme), &passwd),
        "kernel",
    );
    let malformed = agent.call("POST", "/v1/vms", Some(&acme), None);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    let missing = image_of(host_path(&image_dir.join("no-such-kernel")));
    let missing = agent.send("POST", "/v1/images", Some(&acme), &missing);
    assert_eq!(
        (missing.status, missing.code()),
        (422, "unprocessable"),
        "{missing:?}"
    );
    let duplicate = agent.send(
        "POST",
        "/v1/vms",
        Some(&acme),
        &VmCreate::new("web", "busybox"),
    );
    assert_eq!((duplicate.status, duplicate.code()), (409, "conflict"));
    let in_use = agent.call("DELETE", &format!("/v1/images/{image}"), Some(&acme), None);
    assert_eq!((in_use.status, in_use.code()), (409, "conflict"));
    let not_running = agent.call("POST", &format!("/v1/vms/{vm}/stop"), Some(&acme), None);
    assert_eq!((not_running.status, not_running.code()), (409, "conflict"));

    // Quotas: 429, and nothing is created.
    let quota = Quota {
        max_vcpus: 2,
        max_memory_mib: 256,
        max_vms: 1,
        ..Quota::default()
    };
    let (_, small) = tenant_with_quota(&agent, "small", quota);
    register_image(&agent, &small, "true");
    let too_big = VmCreate {
        vcpus: 4,
        ..VmCreate::new("a", "busybox")
    };
    let too_big = agent.send("POST", "/v1/vms", Some(&small), &too_big);
    assert_eq!(
        (too_big.status, too_big.code()),
        (429, "quota_exceeded"),
        "{too_big:?}"
    );
    let first = agent.send(
        "POST",
        "/v1/vms",
        Some(&small),
        &VmCreate::new("a", "busybox"),
    );
    assert_eq!(first.status, 201);
    let second = agent.send(
        "POST",
        "/v1/vms",
        Some(&small),
        &VmCreate::new("b", "busybox"),
    );
    assert_eq!((second.status, second.code()), (429, "quota_exceeded"));
    assert_eq!(agent.get::<Vec<Vm>>("/v1/vms", &small).len(), 1);

    // Virtual networks: CIDRs checked, no overlap on the host, tenancy.
    let network: Network = agent.create(
        "/v1/networks",
        &acme,
        &NetworkCreate::new("front", "10.42.0.0/24"),
    );
    assert_eq!(network.gateway, "10.42.0.1");
    assert!(network.vni >= 4096);
    let net_id = &network.id;
    let bad_network = |body: &NetworkCreate, field: &str| {
        assert_invalid(
            &agent.send("POST", "/v1/networks", Some(&acme), body),
            field,
        );
    };
    bad_network(&NetworkCreate::new("x", "10.42.1.5/24"), "cidr");
    bad_network(&NetworkCreate::new("x", "10.0.0.0/8"), "cidr");
    bad_network(&NetworkCreate::new("X", "10.43.0.0/24"), "name");
    let overlap = agent.send(
        "POST",
        "/v1/networks",
        Some(&globex),
        &NetworkCreate::new("b", "10.42.0.128/25"),
    );
    assert_eq!(
        (overlap.status, overlap.code()),
        (409, "conflict"),
        "{overlap:?}"
    );
    let network_path = format!("/v1/networks/{net_id}");
    assert_hidden(
        &agent,
        &globex,
        &[("GET", network_path.clone()), ("DELETE", network_path)],
    );
    assert_eq!(agent.get::<Vec<Network>>("/v1/networks", &globex), []);
    assert_eq!(
        agent
            .get::<Vec<Network>>("/v1/networks", OPERATOR_TOKEN)
            .len(),
        1
    );
    assert_eq!(
        agent
            .call(
                "DELETE",
                &format!("/v1/networks/{net_id}"),
                Some(&acme),
                None
            )
            .status,
        204
    );

    let x = || NetworkCreate::new("x", "10.44.0.0/24");
    bad_network(
        &NetworkCreate {
            dns: Some(vec!["192.0.2.1".to_string(), "nope".to_string()]),
            ..x()
        },
        "dns[1]",
    );
    bad_network(
        &NetworkCreate {
            mtu: Some(100),
            ..x()
        },
        "mtu",
    );

    // Port forwards: ports and NICs checked, host ports unique, tenancy. A
    // port outside the range or a VM or NIC that is not there is a
    // well-formed request that cannot be done (422); a port 0 is invalid.
    let zero = PortForwardCreate::new("web", 31080, 0);
    assert_invalid(
        &agent.send("POST", "/v1/port-forwards", Some(&acme), &zero),
        "vm_port",
    );
    for (body, field) in [
        (PortForwardCreate::new("web", 80, 80), "host_port"),
        (PortForwardCreate::new("web", 31080, 80), "nic"),
        (PortForwardCreate::new("nope", 31080, 80), "vm"),
    ] {
        let reply = agent.send("POST", "/v1/port-forwards", Some(&acme), &body);
        assert_unprocessable(&reply, field);
    }
    let edge = VmCreate {
        nics: vec![VmNicCreate::default()],
        ..VmCreate::new("edge", "busybox")
    };
    let edge = agent.create::<Vm>("/v1/vms", &acme, &edge).id;
    // deliberately untyped: nic and protocol left out, to check their
    // defaults
    let forward = json!({"vm": "edge", "host_port": 31080, "vm_port": 80});
    let created = agent.call("POST", "/v1/port-forwards", Some(&acme), Some(&forward));
    let created: PortForward = expect_as(&created, 201);
    assert_eq!((created.protocol, created.nic), (Protocol::Tcp, 0));
    let taken = agent.call("POST", "/v1/port-forwards", Some(&acme), Some(&forward));
    assert_eq!((taken.status, taken.code()), (409, "conflict"), "{taken:?}");
    let forward_id = &created.id;
    let forward_path = format!("/v1/port-forwards/{forward_id}");
    assert_hidden(
        &agent,
        &globex,
        &[("GET", forward_path.clone()), ("DELETE", forward_path)],
    );
    assert_eq!(
        agent.get::<Vec<PortForward>>("/v1/port-forwards", &globex),
        []
    );
    assert_eq!(
        agent.call("GET", "/v1/port-forwards", None, None).status,
        401
    );
    // Deleting the VM takes its forwards along.
    assert_eq!(
        agent
            .call("DELETE", &format!("/v1/vms/{edge}"), Some(&acme), None)
            .status,
        204
    );
    assert_eq!(
        agent.get::<Vec<PortForward>>("/v1/port-forwards", &acme),
        []
    );

    // A tenant with resources cannot be deleted; a token can be revoked.
    let busy = agent.call("DELETE", &format!("/v1/tenants/{acme_id}"), OP, None);
    assert_eq!((busy.status, busy.code()), (409, "conflict"));
    let tokens = agent.call("GET", &format!("/v1/tenants/{acme_id}/tokens"), OP, None);
    let token_id = expect(&tokens, 200)[0]["id"].as_str().unwrap().to_string();
    assert!(
        tokens.text.find(&acme).is_none(),
        "a token listing shows the secret"
    );
    assert_eq!(
        agent
            .call(
                "DELETE",
                &format!("/v1/tenants/{acme_id}/tokens/{token_id}"),
                OP,
                None
            )
            .status,
        204
    );
    assert_eq!(agent.call("GET", "/v1/vms", Some(&acme), None).status, 401);
}

/// `nubisctl` against a real agent: human and JSON output, and errors as
/// one line with exit status 1.
#[test]
fn nubisctl_covers_the_api() {
    require_kvm();
    let _host = nubis_tests::agent::one_agent_per_host();
    let images = guest_images();
    let dir = TestDir::new("agent-cli");
    let image_dir = images.vmlinux.parent().unwrap().to_path_buf();
    let agent = Agent::start(&dir.join("agent"), &image_dir);
    let url = format!("http://{}", agent.address);
    let ctl = |token: &str, args: &[&str]| {
        let output = std::process::Command::new(nubis_tests::workspace_binary("nubisctl"))
            .arg("--url")
            .arg(&url)
            .arg("--token")
            .arg(token)
            .args(args)
            .output()
            .expect("run nubisctl");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, out, err) = ctl(
        OPERATOR_TOKEN,
        &["--json", "tenant", "create", "cli", "--max-vms", "3"],
    );
    assert_eq!(code, Some(0), "{err}");
    let created: Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(created["quota"]["max_vms"], 3);
    let tenant_id = created["id"].as_str().unwrap();
    let (_, out, _) = ctl(OPERATOR_TOKEN, &["--json", "token", "create", tenant_id]);
    let token: Value = serde_json::from_str(&out).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let (code, out, err) = ctl(OPERATOR_TOKEN, &["tenant", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ID") && out.contains("cli"), "{out}");
    let kernel = images.vmlinux.display().to_string();
    let rootfs = images.rootfs.display().to_string();
    let (code, out, err) = ctl(
        &token,
        &[
            "image",
            "create",
            "busybox",
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs,
            "--cmdline",
            "console=ttyS0",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("rootfs_bytes"), "{out}");
    let (code, out, err) = ctl(
        &token,
        &[
            "--json",
            "vm",
            "create",
            "web",
            "--image",
            "busybox",
            "--memory-mib",
            "64",
            "--disk",
            "8,bw=1000000",
            "--nic",
            "",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let vm: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm["disks"][0]["rate_limit"]["bytes_per_s"], 1_000_000);
    assert_eq!(vm["nics"].as_array().unwrap().len(), 1);
    // Networks and port forwards.
    let (code, out, err) = ctl(
        &token,
        &[
            "--json",
            "network",
            "create",
            "lan",
            "--cidr",
            "10.61.0.0/24",
            "--nat",
            "--dns",
            "192.0.2.53",
            "--mtu",
            "1450",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let lan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            lan["nat"].as_bool(),
            lan["mtu"].as_u64(),
            lan["dns"][0].as_str()
        ),
        (Some(true), Some(1450), Some("192.0.2.53"))
    );
    let (code, out, _) = ctl(&token, &["network", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("lan") && out.contains("10.61.0.0/24"), "{out}");
    let (code, out, err) = ctl(
        &token,
        &[
            "--json",
            "vm",
            "create",
            "gw",
            "--image",
            "busybox",
            "--nic",
            "network=lan,bw=5000",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let gw: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(gw["nics"][0]["network"], lan["id"]);
    assert_eq!(gw["nics"][0]["address"], "10.61.0.2/24");
    let (code, out, err) = ctl(
        &token,
        &[
            "--json",
            "port-forward",
            "create",
            "gw",
            "--host-port",
            "31022",
            "--vm-port",
            "22",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let forward: Value = serde_json::from_str(&out).unwrap();
    let (code, out, _) = ctl(&token, &["port-forward", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("31022"), "{out}");
    let forward_id = forward["id"].as_str().unwrap();
    let (code, _, err) = ctl(&token, &["port-forward", "delete", forward_id]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = ctl(&token, &["network", "delete", "lan"]);
    assert_eq!(code, Some(1), "a network with NICs is kept");
    assert!(err.contains("conflict (409)"), "{err}");
    let (code, _, err) = ctl(&token, &["vm", "delete", "gw"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = ctl(&token, &["network", "delete", "lan"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = ctl(&token, &["vm", "list", "--state", "stopped"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("web") && out.contains("stopped"), "{out}");
    let (code, out, _) = ctl(&token, &["vm", "events", "web"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("created"), "{out}");
    // Errors: one line naming the code, exit status 1.
    let (code, out, err) = ctl(&token, &["vm", "stop", "web"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.starts_with("nubisctl: error: conflict (409)"), "{err}");
    let (code, _, err) = ctl(&token, &["vm", "show", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not_found (404)"), "{err}");
    let (code, _, err) = ctl(
        &token,
        &["vm", "create", "x", "--image", "busybox", "--vcpus", "0"],
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("invalid_input") && err.contains("field: vcpus"),
        "{err}"
    );
    let (code, _, err) = ctl("wrong", &["vm", "list"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unauthorized (401)"), "{err}");
    let (code, out, err) = ctl(&token, &["vm", "delete", "web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted"), "{out}");
    // Upload: the files are streamed to the agent and an image registered
    // from them; another tenant cannot use them.
    let (code, out, err) = ctl(
        &token,
        &[
            "--json",
            "image",
            "upload",
            "uploaded",
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs,
            "--cmdline",
            "console=ttyS0",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let image: Image = serde_json::from_str(&out).expect("JSON output");
    assert!(image.kernel.contains("/uploads/"), "{image:?}");
    assert!(
        std::fs::read(&image.kernel).unwrap() == std::fs::read(&images.vmlinux).unwrap(),
        "the uploaded kernel differs"
    );
    assert_eq!(
        image.rootfs_bytes,
        std::fs::metadata(&images.rootfs).unwrap().len()
    );
    let uploads = agent.call("GET", "/v1/uploads", Some(&token), None);
    assert_eq!(expect(&uploads, 200).as_array().unwrap().len(), 2);
    let (_, other) = tenant(&agent, "other");
    let stolen = ImageCreate {
        name: "stolen".to_string(),
        kernel: image.kernel,
        rootfs: image.rootfs,
        initrd: None,
        cmdline: String::new(),
    };
    let stolen = agent.send("POST", "/v1/images", Some(&other), &stolen);
    assert_eq!(
        (stolen.status, stolen.code()),
        (422, "unprocessable"),
        "{stolen:?}"
    );
    let in_use = agent.call("DELETE", "/v1/uploads/uploaded.kernel", Some(&token), None);
    assert_eq!((in_use.status, in_use.code()), (409, "conflict"));
    let bad_name = agent.call("PUT", "/v1/uploads/..", Some(&token), None);
    assert_eq!(bad_name.status, 400, "{bad_name:?}");
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not a kernel").unwrap();
    let (code, _, err) = ctl(&token, &["upload", "put", "notes", notes.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = ctl(&token, &["upload", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("notes") && out.contains("uploaded.rootfs"),
        "{out}"
    );
    let (code, out, err) = ctl(&token, &["upload", "delete", "notes"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (code, out, _) = ctl(OPERATOR_TOKEN, &["metrics"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("nubis_vms{state=\"stopped\"}"), "{out}");
    let (code, out, _) = ctl(&token, &["openapi"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"openapi\""), "{out}");
}
