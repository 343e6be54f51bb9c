//! The host agent end to end: a real `nubis-agent` over real HTTP, with
//! real VMs booted by real `nubis-vmm` processes.

use std::time::{Duration, Instant};

use nubis_tests::agent::{
    expect, tenant, wait_for_console, Agent, Reply, BOOT_GUARD, OPERATOR_TOKEN,
};
use nubis_tests::net::links_with_prefix;
use nubis_tests::{guest_images, require_kvm, TestDir};
use serde_json::{json, Value};

const OP: Option<&str> = Some(OPERATOR_TOKEN);

fn register_image(agent: &Agent, token: &str, command: &str) -> String {
    let images = guest_images();
    let reply = agent.call(
        "POST",
        "/v1/images",
        Some(token),
        Some(&json!({
            "name": "busybox",
            "kernel": images.vmlinux,
            "rootfs": images.rootfs,
            "cmdline": format!("{} root=/dev/vda ro nubis_cmd=\"{command}\"", images.cmdline),
        })),
    );
    expect(&reply, 201)["id"].as_str().unwrap().to_string()
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
    let back = agent.call(
        "POST",
        "/v1/networks",
        Some(&acme),
        Some(&json!({"name": "back", "cidr": "10.77.0.0/24"})),
    );
    let back = expect(&back, 201).clone();
    let mut vms = Vec::new();
    let mut addresses = Vec::new();
    for (name, nic) in [("web", json!({})), ("db", json!({"network": "back"}))] {
        let reply = agent.call(
            "POST",
            "/v1/vms",
            Some(&acme),
            Some(&json!({"name": name, "image": image, "memory_mib": 128,
                         "disks": [{"size_mib": 16, "rate_limit": {"bytes_per_s": 10485760}}],
                         "nics": [nic]})),
        );
        let vm = expect(&reply, 201);
        assert_eq!(vm["state"], "stopped");
        let nic = &vm["nics"][0];
        assert!(
            nic["mac"].as_str().unwrap().starts_with("02:4e:42:"),
            "{vm}"
        );
        let address = nic["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/24")
            .to_string();
        if name == "db" {
            assert_eq!(address, "10.77.0.2", "db's address comes from its network");
            assert_eq!(nic["network"], back["id"]);
        }
        assert!(!addresses.contains(&address), "two NICs got {address}");
        addresses.push(address);
        vms.push(vm["id"].as_str().unwrap().to_string());
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
    for (method, path) in [
        ("GET", format!("/v1/vms/{web}")),
        ("POST", format!("/v1/vms/{web}/stop")),
        ("GET", format!("/v1/vms/{web}/console")),
        ("DELETE", format!("/v1/vms/{web}")),
    ] {
        let reply = agent.call(method, &path, Some(&globex), None);
        assert_eq!(
            (reply.status, reply.code()),
            (404, "not_found"),
            "{method} {path}"
        );
    }
    assert_eq!(
        expect(&agent.call("GET", "/v1/vms", Some(&globex), None), 200),
        &json!([])
    );
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
    assert_eq!(
        expect(&agent.call("GET", "/v1/vms", Some(&acme), None), 200),
        &json!([])
    );
    assert_eq!(
        agent
            .call("DELETE", &format!("/v1/images/{image}"), Some(&acme), None)
            .status,
        204
    );
    let network_bridge = format!("nbn{}", back["vni"]);
    assert!(link_exists(&network_bridge), "no bridge {network_bridge}");
    let back_id = back["id"].as_str().unwrap();
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
    let vm = agent.call(
        "POST",
        "/v1/vms",
        Some(&acme),
        Some(&json!({"name": "web", "image": "busybox"})),
    );
    let vm = expect(&vm, 201)["id"].as_str().unwrap().to_string();

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
    for (method, path) in &operator_only {
        let reply = agent.call(method, path, Some(&acme), Some(&json!({"name": "x"})));
        assert_eq!(
            (reply.status, reply.code()),
            (403, "forbidden"),
            "{method} {path} as a tenant"
        );
    }
    for (method, path) in &tenant_resources {
        let reply = agent.call(method, path, Some(&globex), None);
        assert_eq!(
            (reply.status, reply.code()),
            (404, "not_found"),
            "{method} {path} as another tenant"
        );
    }
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
    let bad = |method: &str, path: &str, token: &str, body: Value, field: &str| {
        let reply = agent.call(method, path, Some(token), Some(&body));
        assert_eq!(
            (reply.status, reply.code()),
            (400, "invalid_input"),
            "{body}: {reply:?}"
        );
        assert_eq!(reply.body["error"]["field"], field, "{body}: {reply:?}");
    };
    bad(
        "POST",
        "/v1/tenants",
        OPERATOR_TOKEN,
        json!({"name": "Bad Name"}),
        "name",
    );
    bad(
        "POST",
        "/v1/tenants",
        OPERATOR_TOKEN,
        json!({"name": "ok", "quota": {"max_vcpus": 0, "max_memory_mib": 1, "max_vms": 1}}),
        "quota",
    );
    bad(
        "POST",
        "/v1/tenants",
        OPERATOR_TOKEN,
        json!({"name": "ok", "colour": "red"}),
        "colour",
    );
    bad("POST", "/v1/tenants", OPERATOR_TOKEN, json!({}), "name");
    let vm_body = |extra: Value| {
        let mut body = json!({"name": "db", "image": "busybox"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"vcpus": 0})),
        "vcpus",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"memory_mib": 1})),
        "memory_mib",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"name": "-x"})),
        "name",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"cpus": 2})),
        "cpus",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"kernel_args": "a\nb"})),
        "kernel_args",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"disks": [{"size_mib": 0}]})),
        "disks[0].size_mib",
    );
    bad(
        "POST",
        "/v1/vms",
        &acme,
        vm_body(json!({"disks": [{"size_mib": 1, "rate_limit": {"ops_per_s": 0}}]})),
        "disks[0].rate_limit",
    );
    bad(
        "POST",
        "/v1/images",
        &acme,
        json!({"name": "x", "kernel": "relative/vmlinux", "rootfs": images.rootfs}),
        "kernel",
    );
    // Valid by the document, but naming what the tenant has not or may
    // not use: 422 with the field named.
    for (path, body, field) in [
        ("/v1/vms", vm_body(json!({"image": "nope"})), "image"),
        (
            "/v1/images",
            json!({"name": "x", "kernel": "/etc/passwd", "rootfs": images.rootfs}),
            "kernel",
        ),
    ] {
        let reply = agent.call("POST", path, Some(&acme), Some(&body));
        assert_eq!(
            (
                reply.status,
                reply.code(),
                reply.body["error"]["field"].as_str()
            ),
            (422, "unprocessable", Some(field)),
            "{body}: {reply:?}"
        );
    }
    let malformed = agent.call("POST", "/v1/vms", Some(&acme), None);
    assert_eq!(malformed.status, 400, "{malformed:?}");
    let missing = agent.call(
        "POST",
        "/v1/images",
        Some(&acme),
        Some(&json!({"name": "x", "kernel": image_dir.join("no-such-kernel"), "rootfs": images.rootfs})),
    );
    assert_eq!(
        (missing.status, missing.code()),
        (422, "unprocessable"),
        "{missing:?}"
    );
    let duplicate = agent.call(
        "POST",
        "/v1/vms",
        Some(&acme),
        Some(&json!({"name": "web", "image": "busybox"})),
    );
    assert_eq!((duplicate.status, duplicate.code()), (409, "conflict"));
    let in_use = agent.call("DELETE", &format!("/v1/images/{image}"), Some(&acme), None);
    assert_eq!((in_use.status, in_use.code()), (409, "conflict"));
    let not_running = agent.call("POST", &format!("/v1/vms/{vm}/stop"), Some(&acme), None);
    assert_eq!((not_running.status, not_running.code()), (409, "conflict"));

    // Quotas: 429, and nothing is created.
    let small = agent.call(
        "POST",
        "/v1/tenants",
        OP,
        Some(&json!({"name": "small", "quota": {"max_vcpus": 2, "max_memory_mib": 256, "max_vms": 1}})),
    );
    let small_id = expect(&small, 201)["id"].as_str().unwrap().to_string();
    let token = agent.call("POST", &format!("/v1/tenants/{small_id}/tokens"), OP, None);
    let small = expect(&token, 201)["token"].as_str().unwrap().to_string();
    register_image(&agent, &small, "true");
    let too_big = agent.call(
        "POST",
        "/v1/vms",
        Some(&small),
        Some(&json!({"name": "a", "image": "busybox", "vcpus": 4})),
    );
    assert_eq!(
        (too_big.status, too_big.code()),
        (429, "quota_exceeded"),
        "{too_big:?}"
    );
    let first = agent.call(
        "POST",
        "/v1/vms",
        Some(&small),
        Some(&json!({"name": "a", "image": "busybox"})),
    );
    assert_eq!(first.status, 201);
    let second = agent.call(
        "POST",
        "/v1/vms",
        Some(&small),
        Some(&json!({"name": "b", "image": "busybox"})),
    );
    assert_eq!((second.status, second.code()), (429, "quota_exceeded"));
    assert_eq!(
        expect(&agent.call("GET", "/v1/vms", Some(&small), None), 200)
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Virtual networks: CIDRs checked, no overlap on the host, tenancy.
    let network = agent.call(
        "POST",
        "/v1/networks",
        Some(&acme),
        Some(&json!({"name": "front", "cidr": "10.42.0.0/24"})),
    );
    let network = expect(&network, 201).clone();
    assert_eq!(network["gateway"], "10.42.0.1");
    assert!(network["vni"].as_u64().unwrap() >= 4096);
    let net_id = network["id"].as_str().unwrap();
    bad(
        "POST",
        "/v1/networks",
        &acme,
        json!({"name": "x", "cidr": "10.42.1.5/24"}),
        "cidr",
    );
    bad(
        "POST",
        "/v1/networks",
        &acme,
        json!({"name": "x", "cidr": "10.0.0.0/8"}),
        "cidr",
    );
    bad(
        "POST",
        "/v1/networks",
        &acme,
        json!({"name": "X", "cidr": "10.43.0.0/24"}),
        "name",
    );
    let overlap = agent.call(
        "POST",
        "/v1/networks",
        Some(&globex),
        Some(&json!({"name": "b", "cidr": "10.42.0.128/25"})),
    );
    assert_eq!(
        (overlap.status, overlap.code()),
        (409, "conflict"),
        "{overlap:?}"
    );
    for (method, path) in [
        ("GET", format!("/v1/networks/{net_id}")),
        ("DELETE", format!("/v1/networks/{net_id}")),
    ] {
        let reply = agent.call(method, &path, Some(&globex), None);
        assert_eq!(
            (reply.status, reply.code()),
            (404, "not_found"),
            "{method} {path}"
        );
    }
    assert_eq!(
        expect(&agent.call("GET", "/v1/networks", Some(&globex), None), 200),
        &json!([])
    );
    assert_eq!(
        expect(&agent.call("GET", "/v1/networks", OP, None), 200)
            .as_array()
            .unwrap()
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

    bad(
        "POST",
        "/v1/networks",
        &acme,
        json!({"name": "x", "cidr": "10.44.0.0/24", "dns": ["192.0.2.1", "nope"]}),
        "dns[1]",
    );
    bad(
        "POST",
        "/v1/networks",
        &acme,
        json!({"name": "x", "cidr": "10.44.0.0/24", "mtu": 100}),
        "mtu",
    );

    // Port forwards: ports and NICs checked, host ports unique, tenancy. A
    // port outside the range or a VM or NIC that is not there is a
    // well-formed request that cannot be done (422); a port 0 is invalid.
    bad(
        "POST",
        "/v1/port-forwards",
        &acme,
        json!({"vm": "web", "host_port": 31080, "vm_port": 0}),
        "vm_port",
    );
    for (body, field) in [
        (
            json!({"vm": "web", "host_port": 80, "vm_port": 80}),
            "host_port",
        ),
        (
            json!({"vm": "web", "host_port": 31080, "vm_port": 80}),
            "nic",
        ),
        (
            json!({"vm": "nope", "host_port": 31080, "vm_port": 80}),
            "vm",
        ),
    ] {
        let reply = agent.call("POST", "/v1/port-forwards", Some(&acme), Some(&body));
        assert_eq!(
            (
                reply.status,
                reply.code(),
                reply.body["error"]["field"].as_str()
            ),
            (422, "unprocessable", Some(field)),
            "{body}: {reply:?}"
        );
    }
    let edge = agent.call(
        "POST",
        "/v1/vms",
        Some(&acme),
        Some(&json!({"name": "edge", "image": "busybox", "nics": [{}]})),
    );
    let edge = expect(&edge, 201)["id"].as_str().unwrap().to_string();
    let forward = json!({"vm": "edge", "host_port": 31080, "vm_port": 80});
    let created = agent.call("POST", "/v1/port-forwards", Some(&acme), Some(&forward));
    let created = expect(&created, 201).clone();
    assert_eq!(
        (created["protocol"].as_str(), created["nic"].as_u64()),
        (Some("tcp"), Some(0))
    );
    let taken = agent.call("POST", "/v1/port-forwards", Some(&acme), Some(&forward));
    assert_eq!((taken.status, taken.code()), (409, "conflict"), "{taken:?}");
    let forward_id = created["id"].as_str().unwrap();
    for method in ["GET", "DELETE"] {
        let reply = agent.call(
            method,
            &format!("/v1/port-forwards/{forward_id}"),
            Some(&globex),
            None,
        );
        assert_eq!((reply.status, reply.code()), (404, "not_found"), "{method}");
    }
    assert_eq!(
        expect(
            &agent.call("GET", "/v1/port-forwards", Some(&globex), None),
            200
        ),
        &json!([])
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
        expect(
            &agent.call("GET", "/v1/port-forwards", Some(&acme), None),
            200
        ),
        &json!([])
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
    let image: Value = serde_json::from_str(&out).expect("JSON output");
    let stored_kernel = image["kernel"].as_str().unwrap().to_string();
    assert!(stored_kernel.contains("/uploads/"), "{image}");
    assert!(
        std::fs::read(&stored_kernel).unwrap() == std::fs::read(&images.vmlinux).unwrap(),
        "the uploaded kernel differs"
    );
    assert_eq!(
        image["rootfs_bytes"].as_u64(),
        Some(std::fs::metadata(&images.rootfs).unwrap().len())
    );
    let uploads = agent.call("GET", "/v1/uploads", Some(&token), None);
    assert_eq!(expect(&uploads, 200).as_array().unwrap().len(), 2);
    let (_, other) = tenant(&agent, "other");
    let stolen = agent.call(
        "POST",
        "/v1/images",
        Some(&other),
        Some(&json!({"name": "stolen", "kernel": stored_kernel, "rootfs": image["rootfs"]})),
    );
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
