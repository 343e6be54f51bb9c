#!/usr/bin/env python3
"""Cluster benchmark: prints figures, asserts nothing.

Brings up three simulated hosts with scripts/cluster.sh (up --no-demo: network
namespaces, a three-member etcd cluster with TLS, one nubis-agent per host in
cluster mode) and measures, through the cluster's REST API:
  (a) placement and start: N small busybox VMs (1 vCPU) created at once,
      spread over the three hosts' APIs, each with "start": true; per VM the
      create request, the time until it is placed (its host set) and until it
      is `running` as listed through host a (its VMM answers; the guest's boot
      is not waited for), and VMs running per second for the batch
  (b) API latency p50/p99 in cluster mode, through host a: GET /v1/vms, GET
      /v1/vms/{id} of a VM on host a and of one on host b (forwarded over the
      peer channel), against a standalone agent started here (in a network
      namespace of its own, reached over a veth as the hosts are) with the same
      VMs defined
  (c) controller failover: SIGKILL of the controller's agent, time until
      another host reports being the controller, and until a VM created
      through a survivor right after the kill is placed; then the agent is
      started again (time until it is up again)
  (d) host loss: a host's underlay link (its only link to the other hosts and
      to etcd) set down: time until `down` in /v1/hosts through another host,
      with the lease TTL; then the link set up: time until it is `up` again
  (e) host drain: N idle busybox VMs (1 vCPU, a NIC on a network of the
      cluster) started on host-a (host-b and host-c cordoned meanwhile), their
      guests booted; then POST /v1/hosts/host-a/drain with max_parallel 1, 2,
      4 (a round each): time until the drain is done, per VM the time until it
      is `running` on its new host, the downtime its live migration reports
      (GET /v1/vms/{id}/migration, answered by host-a, which drove it), and
      where the VMs went
  (f) a service behind an endpoint: three busybox httpd instances (HTTP
      probe), a client opening one connection after another to the
      endpoint's host port on host-b, from this namespace; the success rate
      and the answering instances while the host of one instance is drained
      (live migration), while the role is upgraded one update domain at a
      time, and when the host of one instance is lost (its underlay link
      set down): the time until that instance answers again elsewhere
      (started afresh from its image), and the endpoint's failures meanwhile
Needs root, /dev/kvm, the release build and guest-images/build.sh's outputs
(scripts/cluster.sh runs install-deps, the image build and cargo build first).
Usage: bench/cluster.py [--vms N] [--memory-mib M] [--reads N] [--lease-ttl S]
                        [--drain-vms N] [--drain-parallel P,...]
                        [--only a|b|c|d|e|f ...] [--reuse] [--keep]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from agent import MARKER, Api, latency_line, machine_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SH = os.path.join(ROOT, "scripts/cluster.sh")
# The standalone agent's namespace and link: next to cluster.sh's 10.95.1-3.
SOLO_NETNS, SOLO_SUBNET, SOLO_PORT = "nubis-cl-solo", "10.95.9", 8080
POLL_S = 0.05


def read_env(path):
    env = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key:
                env[key] = value
    return env


def api_for(url, token):
    host, _, port = url.removeprefix("http://").partition(":")
    return Api(int(port), token, host)


def tenant(operator, name, max_vms=64):
    """A tenant with room for the benchmark's VMs, and an Api with its token."""
    created = operator.call("POST", "/v1/tenants", {"name": name, "quota": {
        "max_vcpus": 128, "max_memory_mib": 65536, "max_vms": max_vms}})
    token = operator.call("POST", f"/v1/tenants/{created['id']}/tokens")["token"]
    return created["id"], token


def register_image(api, images):
    with open(os.path.join(images, "cmdline")) as f:
        cmdline = f.read().strip()
    return api.call("POST", "/v1/images", {
        "name": "busybox", "kernel": os.path.join(images, "vmlinux"),
        "rootfs": os.path.join(images, "rootfs.ext4"),
        "cmdline": f'{cmdline} root=/dev/vda ro nubis_cmd="echo BENCH_VM_UP; read wait_forever"'})


def wait_until(what, guard_s, check):
    """Polls `check` until it gives a value; an API error meanwhile (etcd
    re-electing after a host loss answers 503) is polled through."""
    start = time.monotonic()
    while True:
        try:
            value = check()
        except (OSError, RuntimeError) as err:
            if time.monotonic() - start > guard_s:
                raise RuntimeError(f"{what}: not within {guard_s} s ({err})") from err
            value = None
        if value:
            return value
        if time.monotonic() - start > guard_s:
            raise RuntimeError(f"{what}: not within {guard_s} s")
        time.sleep(POLL_S)


def hosts(api):
    return {h["name"]: h for h in api.call("GET", "/v1/hosts")}


def controller(api):
    try:
        return next((name for name, h in hosts(api).items() if h["controller"]), None)
    except (OSError, RuntimeError):
        return None


def timed(api, path, count):
    samples = []
    for _ in range(count):
        start = time.monotonic()
        api.call("GET", path)
        samples.append((time.monotonic() - start) * 1000)
    return samples


def delete_all(api, what):
    for vm in api.call("GET", "/v1/vms"):
        try:
            api.call("DELETE", f"/v1/vms/{vm['id']}")
        except (OSError, RuntimeError) as err:
            print(f"cleanup ({what}): {vm['name']}: {err}", file=sys.stderr)


def placement_and_start(urls, token, count, memory_mib):
    """(a): `count` VMs created at once through the three hosts in turn."""
    apis = [api_for(url, token) for url in urls]
    lister = apis[0]
    created, lock, errors = {}, threading.Lock(), []

    def create(index):
        api = apis[index % len(apis)]
        try:
            t0 = time.monotonic()
            vm = api.call("POST", "/v1/vms", {"name": f"burst-{index}", "image": "busybox",
                                              "memory_mib": memory_mib, "start": True})
            with lock:
                created[vm["id"]] = {"t0": t0, "created": time.monotonic()}
        except (OSError, RuntimeError) as err:
            with lock:
                errors.append(str(err))
    threads = [threading.Thread(target=create, args=(i,)) for i in range(count)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One listing through host a every POLL_S, as a client watching would.
    deadline = start + 900
    while time.monotonic() < deadline:
        now = time.monotonic()
        for vm in lister.call("GET", "/v1/vms"):
            seen = created.get(vm["id"])
            if seen is None:
                continue
            if vm.get("host") and "placed" not in seen:
                seen["placed"], seen["host"] = now, vm["host"]
            if vm["state"] == "running" and "running" not in seen:
                seen["running"] = now
            if vm["state"] == "failed" and "failed" not in seen:
                errors.append(f"{vm['name']} failed on {vm.get('host')}")
                seen["failed"] = now
        if all("running" in seen or "failed" in seen for seen in created.values()):
            break
        time.sleep(POLL_S)
    wall = max((s["running"] for s in created.values() if "running" in s), default=start) - start
    return created, errors, wall


def failover(env, urls, operator_token, create_api):
    """(c): kill -9 the controller's agent; returns the figures."""
    apis = {name: api_for(url, operator_token) for name, url in urls.items()}
    leader = wait_until("a controller", 60, lambda: controller(apis["a"]))
    short = leader.removeprefix("host-")
    witness = next(name for name in apis if name != short)
    pid = int(open(os.path.join(env["NUBIS_CLUSTER_DIR"], short, "agent.pid")).read())
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    vm = create_api[witness].call("POST", "/v1/vms", {"name": "after-failover", "image": "busybox"})
    figures = {"leader": leader}

    def check():
        now = time.monotonic()
        listed = hosts(apis[witness])
        new = next((n for n, h in listed.items() if h["controller"]), None)
        if new and new != leader and "elected" not in figures:
            figures["elected"], figures["new"] = now - t0, new
        if listed[leader]["state"] == "down" and "down" not in figures:
            figures["down"] = now - t0
        placed = create_api[witness].call("GET", f"/v1/vms/{vm['id']}").get("host")
        if placed and "placed" not in figures:
            figures["placed"], figures["placed_on"] = now - t0, placed
        return all(k in figures for k in ("elected", "down", "placed"))
    wait_until("failover", 120, check)
    t1 = time.monotonic()
    subprocess.run([CLUSTER_SH, "start-agent", short], check=True)
    wait_until(f"{leader} up again", 120,
               lambda: hosts(apis[witness])[leader]["state"] == "up")
    figures["rejoined"] = time.monotonic() - t1
    return figures


def host_loss(env, urls, operator_token):
    """(d): cut a non-controller host's underlay link, then restore it."""
    apis = {name: api_for(url, operator_token) for name, url in urls.items()}
    leader = wait_until("a controller", 60, lambda: controller(apis["a"]))
    lost = next(name for name in ("c", "b", "a") if f"host-{name}" != leader)
    witness = next(name for name in apis if name != lost)
    port = env[f"NUBIS_UNDERLAY_PORT_{lost.upper()}"]
    underlay_ns = env["NUBIS_UNDERLAY_NETNS"]
    figures = {"host": f"host-{lost}"}
    subprocess.run(["ip", "-n", underlay_ns, "link", "set", port, "down"], check=True)
    t0 = time.monotonic()
    try:
        wait_until("host down", 120,
                   lambda: hosts(apis[witness])[f"host-{lost}"]["state"] == "down")
        figures["down"] = time.monotonic() - t0
    finally:
        subprocess.run(["ip", "-n", underlay_ns, "link", "set", port, "up"], check=True)
    t1 = time.monotonic()
    wait_until("host up again", 180,
               lambda: hosts(apis[witness])[f"host-{lost}"]["state"] == "up")
    figures["up"] = time.monotonic() - t1
    return figures


def drain_round(urls, token, operator_token, count, memory_mib, max_parallel, index):
    """(e), one round: `count` VMs started on host-a, then host-a drained."""
    operator = api_for(urls["a"], operator_token)
    a = api_for(urls["a"], token)
    network = f"drain-{index}"
    a.call("POST", "/v1/networks", {"name": network, "cidr": f"10.73.{index}.0/24"})
    others = [f"host-{name}" for name in urls if name != "a"]
    for host in others:
        operator.call("POST", f"/v1/hosts/{host}/cordon")
    ids = []
    try:
        for n in range(count):
            ids.append(a.call("POST", "/v1/vms", {
                "name": f"drain-{index}-{n}", "image": "busybox", "memory_mib": memory_mib,
                "nics": [{"network": network}], "start": True})["id"])
        t0 = time.monotonic()

        def all_running_on_a():
            listed = {vm["id"]: vm for vm in a.call("GET", "/v1/vms")}
            bad = [listed[i] for i in ids if listed[i]["state"] == "failed"]
            if bad:
                raise RuntimeError(f"{bad[0]['name']} failed on {bad[0].get('host')}")
            return all(listed[i].get("host") == "host-a" and listed[i]["state"] == "running"
                       for i in ids)
        wait_until("the drain VMs running on host-a", 300, all_running_on_a)
        # Idle guests: each one's init printed its marker.
        wait_until("the drain VMs' guests booted", 900, lambda: all(
            "\n" + MARKER in a.call("GET", f"/v1/vms/{i}/console") for i in ids))
        booted = time.monotonic() - t0
    finally:
        for host in others:
            operator.call("POST", f"/v1/hosts/{host}/uncordon")

    seen, drain, downtime = {}, {}, {}
    try:
        drain_and_watch(a, operator, ids, max_parallel, seen, drain, downtime)
    finally:
        # Cleanup: host-a back in service, the VMs and the network gone.
        operator.call("POST", "/v1/hosts/host-a/uncordon")
        for vm_id in ids:
            try:
                a.call("DELETE", f"/v1/vms/{vm_id}")
            except (OSError, RuntimeError) as err:
                print(f"cleanup (drain): {vm_id}: {err}", file=sys.stderr)
        wait_until("the drain VMs deleted", 120,
                   lambda: not any(vm["id"] in ids for vm in a.call("GET", "/v1/vms")))

        def network_deleted():
            try:
                a.call("DELETE", f"/v1/networks/{network}")
                return True
            except RuntimeError:
                return False
        wait_until("the drain network deleted", 60, network_deleted)
    return {"booted": booted, "drain": drain, "seen": seen, "downtime": downtime, "ids": ids}


def drain_and_watch(a, operator, ids, max_parallel, seen, drain, downtime):
    """Drains host-a, watching through it: the drain's end, each VM running elsewhere."""
    t0 = time.monotonic()
    operator.call("POST", "/v1/hosts/host-a/drain", {"max_parallel": max_parallel})
    deadline = t0 + 900
    while time.monotonic() < deadline:
        now = time.monotonic()
        for vm in a.call("GET", "/v1/vms"):
            if vm["id"] in ids and vm["id"] not in seen and vm["state"] == "running" \
                    and vm.get("host") not in (None, "host-a"):
                seen[vm["id"]] = (now - t0, vm["host"])
        if "done" not in drain:
            progress = operator.call("GET", "/v1/hosts/host-a").get("drain") or {}
            if progress.get("done"):
                drain["done"], drain["progress"] = now - t0, progress
        if "done" in drain and len(seen) == len(ids):
            break
        if "done" in drain and now - t0 > drain["done"] + 60:
            break
        time.sleep(POLL_S)
    for vm_id in seen:
        try:
            migration = a.call("GET", f"/v1/vms/{vm_id}/migration")
        except (OSError, RuntimeError):
            continue
        if isinstance(migration, dict) and migration.get("downtime_ms") is not None:
            downtime[vm_id] = migration["downtime_ms"]


SERVING = ("nubis_cmd=\"mkdir -p /w; set -- $(ip -o -4 addr show dev eth0); "
           "echo {version} $4 > /w/index.html; echo ok > /w/health; httpd -p 80 -h /w; "
           "echo SERVING; read wait_forever\"")
HOST_PORT = 30080


class EndpointClient:
    """Opens one connection after another to `address` until stopped; keeps
    each answer's body (or the error)."""

    def __init__(self, address):
        self.address, self.answers, self.stopped = address, [], False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        import socket
        while not self.stopped:
            t0 = time.monotonic()
            try:
                with socket.create_connection(self.address, timeout=15) as conn:
                    conn.settimeout(15)
                    conn.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
                    data = b""
                    while chunk := conn.recv(4096):
                        data += chunk
                body = data.split(b"\r\n\r\n", 1)[1].decode().strip()
                self.answers.append((t0, True, body))
            except (OSError, IndexError) as err:
                self.answers.append((t0, False, str(err)))
            time.sleep(0.05)

    def window(self, start, end):
        return [a for a in self.answers if start <= a[0] < end]

    def stop(self):
        self.stopped = True
        self.thread.join(timeout=30)


def rate(answers):
    ok = sum(1 for _, good, _ in answers if good)
    by = {body.split()[-1] for _, good, body in answers if good}
    failed = [body for _, good, body in answers if not good]
    return (f"{ok}/{len(answers)} connections answered"
            f" ({100.0 * ok / len(answers) if answers else 0:.1f}%) by {len(by)} instances"
            + (f"; first failure: {failed[0]}" if failed else ""))


def service_round(env, urls, token, operator_token, memory_mib):
    """(f): a service behind an endpoint through a drain, an upgrade and a host loss."""
    a = api_for(urls["a"], token)
    operator = api_for(urls["a"], operator_token)
    # Host-b is never the one lost: what is asked while a host is away
    # goes through it.
    via_b = api_for(urls["b"], token)
    operator_b = api_for(urls["b"], operator_token)
    with open(os.path.join(env["NUBIS_IMAGES"], "cmdline")) as f:
        cmdline = f.read().strip()
    images = env["NUBIS_IMAGES"]
    a.call("POST", "/v1/images", {
        "name": "httpd", "kernel": os.path.join(images, "vmlinux"),
        "rootfs": os.path.join(images, "rootfs.ext4"), "cmdline": f"{cmdline} root=/dev/vda rw"})
    a.call("POST", "/v1/networks", {"name": "web", "cidr": "10.74.0.0/24"})
    probe = {"protocol": "http", "port": 80, "path": "/health", "interval_s": 2,
             "timeout_ms": 5000, "threshold": 2, "start_grace_s": 300}
    service = a.call("POST", "/v1/services", {"name": "bench", "roles": [{
        "name": "web", "image": "httpd", "memory_mib": memory_mib, "instances": 3,
        "networks": ["web"], "kernel_args": SERVING.format(version="v1"), "probe": probe,
        "endpoints": [{"protocol": "tcp", "port": 80, "host_port": HOST_PORT}]}]})
    sid = service["id"]
    figures = {}

    def role(api=a):
        return api.call("GET", f"/v1/services/{sid}")["roles"][0]

    def settled(revision):
        r = role()
        live = [i for i in r["instances"] if not i["retiring"]]
        return len(r["instances"]) == 3 and all(
            i["health"] == "healthy" and i["revision"] == revision for i in live) and r
    t0 = time.monotonic()
    r = wait_until("three healthy instances", 900, lambda: settled(1))
    figures["healthy"] = time.monotonic() - t0
    b_reach = urls["b"].removeprefix("http://").partition(":")[0]
    client = EndpointClient((b_reach, HOST_PORT))
    try:
        wait_until("the endpoint answers", 120, lambda: any(g for _, g, _ in client.answers))
        # Drain the host of one instance (not host-b, which the client uses).
        drained = next(i["host"] for i in r["instances"] if i["host"] != "host-b")
        start = time.monotonic()
        operator.call("POST", f"/v1/hosts/{drained}/drain", {})
        wait_until("drained", 300, lambda: (operator.call(
            "GET", f"/v1/hosts/{drained}").get("drain") or {}).get("done"))
        wait_until("healthy after the drain", 300, lambda: settled(1))
        time.sleep(5)
        figures["drain"] = (drained, time.monotonic() - start, rate(client.window(start, time.monotonic())))
        operator.call("POST", f"/v1/hosts/{drained}/uncordon")
        # A rolling upgrade.
        start = time.monotonic()
        a.call("POST", f"/v1/services/{sid}/upgrade", {
            "role": "web", "kernel_args": SERVING.format(version="v2")})
        wait_until("the rollout done", 1200,
                   lambda: (role().get("rollout") or {}).get("state") == "done")
        wait_until("healthy after the rollout", 300, lambda: settled(2))
        done = time.monotonic()
        time.sleep(5)
        figures["upgrade"] = (done - start, rate(client.window(start, time.monotonic())))
        # Lose the host of one instance (not host-b, nor the controller).
        r = role(via_b)
        leader = controller(operator_b)
        lost_instance = next(i for i in r["instances"]
                             if i["host"] not in ("host-b", leader) and not i["retiring"])
        lost = lost_instance["host"]
        port = env[f"NUBIS_UNDERLAY_PORT_{lost.removeprefix('host-').upper()}"]
        underlay_ns = env["NUBIS_UNDERLAY_NETNS"]
        start = time.monotonic()
        subprocess.run(["ip", "-n", underlay_ns, "link", "set", port, "down"], check=True)
        try:
            shown_down = []

            def elsewhere():
                if not shown_down and hosts(operator_b)[lost]["state"] == "down":
                    shown_down.append(time.monotonic())
                for i in role(via_b)["instances"]:
                    if i["vm_id"] == lost_instance["vm_id"] and i.get("host") != lost \
                            and i["health"] == "healthy":
                        return i
                return None
            moved = wait_until("the lost host's instance healthy elsewhere", 600, elsewhere)
            healthy_at = time.monotonic()
            address = moved["address"].split("/")[0]
            # An instance answers "VERSION ADDRESS/PREFIX".
            wait_until("it answers through the endpoint", 120, lambda: any(
                g and body.split()[-1].split("/")[0] == address
                for t, g, body in client.window(healthy_at, time.monotonic())))
            answered = time.monotonic()
            down_at = shown_down[0] if shown_down else healthy_at
            figures["loss"] = (lost, moved["host"], down_at - start, healthy_at - start,
                               answered - start, rate(client.window(start, answered)))
        finally:
            subprocess.run(["ip", "-n", underlay_ns, "link", "set", port, "up"], check=True)
        wait_until(f"{lost} up again", 180, lambda: hosts(operator_b)[lost]["state"] == "up")
    finally:
        client.stop()
        try:
            a.call("DELETE", f"/v1/services/{sid}")
            wait_until("the instances gone", 300, lambda: not a.call("GET", "/v1/vms"))
            wait_until("the network deleted", 60, lambda: _try(a, "DELETE", "/v1/networks/web"))
        except (OSError, RuntimeError) as err:
            print(f"cleanup (service): {err}", file=sys.stderr)
    return figures


def _try(api, method, path):
    try:
        api.call(method, path)
        return True
    except RuntimeError:
        return False


def start_solo(bin_dir, images, token):
    """A standalone agent in a namespace of its own: (process, Api, data)."""
    subprocess.run(["ip", "netns", "del", SOLO_NETNS], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", SOLO_NETNS], stderr=subprocess.DEVNULL)
    ip = lambda *a: subprocess.run(["ip", *a], check=True)  # noqa: E731
    ip("netns", "add", SOLO_NETNS)
    ip("-n", SOLO_NETNS, "link", "set", "lo", "up")
    ip("link", "add", SOLO_NETNS, "type", "veth", "peer", "name", "mgmt", "netns", SOLO_NETNS)
    ip("addr", "add", f"{SOLO_SUBNET}.1/30", "dev", SOLO_NETNS)
    ip("link", "set", SOLO_NETNS, "up")
    ip("-n", SOLO_NETNS, "addr", "add", f"{SOLO_SUBNET}.2/30", "dev", "mgmt")
    ip("-n", SOLO_NETNS, "link", "set", "mgmt", "up")
    data = tempfile.mkdtemp(prefix="nubis-bench-solo-")
    with open(os.path.join(data, "agent.json"), "w") as config:
        # Its own cgroup and uids, as cluster.sh gives each of its agents.
        json.dump({"image_dirs": [images], "vmm_binary": os.path.join(bin_dir, "nubis-vmm"),
                   "parent_cgroup": "nubis-cl-solo", "jail_uid_first": 1190000,
                   "jail_uid_count": 10000}, config)
    log = open(os.path.join(data, "agent.log"), "w")
    agent = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{SOLO_NETNS}", "--", os.path.join(bin_dir, "nubis-agent"),
         "--listen", f"0.0.0.0:{SOLO_PORT}", "--data-dir", data,
         "--config", os.path.join(data, "agent.json")],
        env=dict(os.environ, NUBIS_OPERATOR_TOKEN=token), stderr=log, stdin=subprocess.DEVNULL)
    api = Api(SOLO_PORT, token, f"{SOLO_SUBNET}.2")
    wait_until("the standalone agent", 30, lambda: _answers(api))
    return agent, api, data


def _answers(api):
    try:
        api.call("GET", "/healthz")
        return True
    except OSError:
        return False


def stop_solo(agent, data):
    agent.terminate()
    agent.wait()
    subprocess.run(["ip", "netns", "del", SOLO_NETNS], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "link", "del", SOLO_NETNS], stderr=subprocess.DEVNULL)
    shutil.rmtree(data, ignore_errors=True)


def latencies(urls, token, operator_token, bin_dir, images, reads):
    """(b): the same reads in the cluster (through host a) and standalone."""
    a = api_for(urls["a"], token)
    pinned = {}
    for name in ("a", "b"):
        vm = a.call("POST", "/v1/vms", {"name": f"lat-{name}", "image": "busybox",
                                        "placement": {"host": f"host-{name}"}})
        pinned[name] = vm["id"]
    wait_until("the latency VMs placed", 60, lambda: all(
        a.call("GET", f"/v1/vms/{vm_id}").get("host") for vm_id in pinned.values()))
    # A third VM, so that both lists hold three.
    a.call("POST", "/v1/vms", {"name": "lat-c", "image": "busybox",
                               "placement": {"host": "host-c"}})
    rows = [("cluster, through host-a: GET /v1/vms", timed(a, "/v1/vms", reads)),
            ("  GET /v1/vms/{id}, VM on host-a", timed(a, f"/v1/vms/{pinned['a']}", reads)),
            ("  GET /v1/vms/{id}, VM on host-b (forwarded)",
             timed(a, f"/v1/vms/{pinned['b']}", reads))]
    agent, solo_operator, data = start_solo(bin_dir, images, operator_token)
    try:
        _, solo_token = tenant(solo_operator, "bench-solo")
        solo = Api(solo_operator.port, solo_token, solo_operator.host)
        register_image(solo, images)
        ids = [solo.call("POST", "/v1/vms", {"name": f"lat-{n}", "image": "busybox"})["id"]
               for n in range(3)]
        rows += [("standalone agent: GET /v1/vms", timed(solo, "/v1/vms", reads)),
                 ("  GET /v1/vms/{id}", timed(solo, f"/v1/vms/{ids[0]}", reads))]
        delete_all(solo, "standalone")
    finally:
        stop_solo(agent, data)
    delete_all(a, "latency VMs")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=12,
                        help="VMs created at once for (a); the hosts offer 8 vCPUs each")
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--reads", type=int, default=300, help="requests per latency figure")
    parser.add_argument("--lease-ttl", type=int, default=10, help="seconds (the agent's default)")
    parser.add_argument("--drain-vms", type=int, default=4,
                        help="VMs on host-a drained for (e); the hosts offer 4 GiB each")
    parser.add_argument("--drain-parallel", default="1,2,4",
                        help="max_parallel of each drain round of (e), comma-separated")
    parser.add_argument("--reuse", action="store_true",
                        help="use a cluster already up (scripts/cluster.sh up --no-demo)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up")
    parser.add_argument("--only", choices=["a", "b", "c", "d", "e", "f"], action="append")
    args = parser.parse_args()
    state = os.environ.get("NUBIS_CLUSTER_DIR", "/var/lib/nubis-cluster")
    up_started = time.monotonic()
    if not args.reuse:
        subprocess.run([CLUSTER_SH, "up", "--no-demo", "--lease-ttl", str(args.lease_ttl)],
                       check=True)
    up_took = time.monotonic() - up_started
    env = read_env(os.path.join(state, "cluster.env"))
    names = env["NUBIS_CLUSTER_HOSTS"].split(",")
    urls = {name: env[f"NUBIS_URL_{name.upper()}"] for name in names}
    operator_token = env["NUBIS_OPERATOR_TOKEN"]
    operator = api_for(urls["a"], operator_token)
    only = set(args.only or "abcdef")
    tenant_id = None
    try:
        tenant_id, token = tenant(operator, f"bench-{int(time.time())}")
        tenant_apis = {name: api_for(url, token) for name, url in urls.items()}
        register_image(tenant_apis["a"], env["NUBIS_IMAGES"])
        for name in names:
            wait_until(f"the image listed on host-{name}", 60,
                       lambda: tenant_apis[name].call("GET", "/v1/images"))
        print(machine_line("nubis cluster benchmark"))
        print(f"three simulated hosts (network namespaces) on this machine, etcd "
              f"{subprocess.run(['etcd', '--version'], capture_output=True, text=True).stdout.split()[2]}"
              f" (3 members, TLS), lease TTL {env['NUBIS_CLUSTER_LEASE_TTL']} s"
              + ("" if args.reuse else f"; scripts/cluster.sh up --no-demo took {up_took:.1f} s"))

        if "b" in only:
            print(f"API latency ({args.reads} sequential requests each, 3 VMs defined, stopped):")
            for name, samples in latencies(urls, token, operator_token, env["NUBIS_BIN_DIR"],
                                           env["NUBIS_IMAGES"], args.reads):
                print(latency_line(name, samples))

        if "a" in only:
            print(f"placement and start: {args.vms} VMs (1 vCPU, {args.memory_mib} MiB, busybox) "
                  f"created at once through the three hosts, \"start\": true:")
            created, errors, wall = placement_and_start(list(urls.values()), token, args.vms,
                                                        args.memory_mib)
            for error in errors:
                print(f"  error: {error}")
            done = [s for s in created.values() if "running" in s]
            if done:
                create_ms = [(s["created"] - s["t0"]) * 1000 for s in done]
                placed = [s["placed"] - s["t0"] for s in done if "placed" in s]
                running = [s["running"] - s["t0"] for s in done]
                per_host = {}
                for s in done:
                    per_host[s.get("host")] = per_host.get(s.get("host"), 0) + 1
                print(f"  create request                    median {statistics.median(create_ms):8.1f}"
                      f"  max {max(create_ms):8.1f} ms")
                print(f"  create to placed (host set)       median {statistics.median(placed):8.2f}"
                      f"  max {max(placed):8.2f} s")
                print(f"  create to running (VMM answers)   median {statistics.median(running):8.2f}"
                      f"  max {max(running):8.2f} s")
                print(f"  all {len(done)} running after {wall:.2f} s: {len(done) / wall:.2f} VMs/s;"
                      f" per host {dict(sorted(per_host.items()))}")
            start = time.monotonic()
            delete_all(tenant_apis["a"], "burst")
            print(f"  deleted through host-a in {time.monotonic() - start:.1f} s")

        if "e" in only:
            print(f"host drain: {args.drain_vms} idle VMs (1 vCPU, {args.memory_mib} MiB, busybox, a"
                  f" NIC on a network of the cluster) started on host-a, then host-a drained"
                  f" (live migration):")
            rounds = [int(p) for p in args.drain_parallel.split(",") if p]
            for index, parallel in enumerate(rounds, start=1):
                r = drain_round(urls, token, operator_token, args.drain_vms, args.memory_mib,
                                parallel, index)
                drain, seen = r["drain"], r["seen"]
                moved = [t for t, _ in seen.values()]
                per_host = {}
                for _, host in seen.values():
                    per_host[host] = per_host.get(host, 0) + 1
                done = (f"done after {drain['done']:6.2f} s" if "done" in drain
                        else "NOT done within the wait")
                stuck = (drain.get("progress") or {}).get("stuck") or []
                print(f"  max_parallel {parallel}: drain {done}"
                      + (f"; stuck {stuck}" if stuck else "")
                      + f" (guests booted {r['booted']:.0f} s after their creation)")
                if moved:
                    print(f"    drain start to running on the new host  median"
                          f" {statistics.median(moved):6.2f}  max {max(moved):6.2f} s"
                          f"  ({len(moved)}/{len(r['ids'])} VMs)")
                if r["downtime"]:
                    ms = list(r["downtime"].values())
                    print(f"    migration downtime                      median"
                          f" {statistics.median(ms):6.0f}  max {max(ms):6.0f} ms"
                          f"  ({len(ms)} VMs)")
                else:
                    print("    migration downtime: not reported")
                print(f"    moved to {dict(sorted(per_host.items()))}")

        if "f" in only:
            print("a service behind an endpoint: 3 busybox httpd instances (HTTP probe every 2 s),"
                  f" a client connecting again and again to host-b:{HOST_PORT} from outside:")
            f = service_round(env, urls, token, operator_token, args.memory_mib)
            print(f"  three instances healthy {f['healthy']:.0f} s after the service's creation")
            if "drain" in f:
                host, took, answered = f["drain"]
                print(f"  drain of {host} (its instance live-migrated), {took:.1f} s: {answered}")
            if "upgrade" in f:
                took, answered = f["upgrade"]
                print(f"  rolling upgrade (2 update domains), {took:.0f} s: {answered}")
            if "loss" in f:
                lost, to, down, healthy, answered, during = f["loss"]
                print(f"  {lost} lost (underlay link down): shown down after {down:.1f} s; its"
                      f" instance healthy on {to} after {healthy:.1f} s, answering through the"
                      f" endpoint after {answered:.1f} s; meanwhile {during}")

        if "c" in only:
            print("controller failover (SIGKILL of the controller's agent):")
            f = failover(env, urls, operator_token, tenant_apis)
            print(f"  {f['leader']} killed; {f['new']} reports being the controller after"
                  f" {f['elected']:.2f} s ({f['leader']} shown down after {f['down']:.2f} s)")
            print(f"  a VM created through a survivor right after the kill placed on"
                  f" {f['placed_on']} after {f['placed']:.2f} s")
            print(f"  {f['leader']}'s agent started again: up after {f['rejoined']:.2f} s")
            delete_all(tenant_apis["a"], "failover")

        if "d" in only:
            print(f"host loss (underlay link set down; lease TTL {env['NUBIS_CLUSTER_LEASE_TTL']} s):")
            f = host_loss(env, urls, operator_token)
            print(f"  {f['host']} shown down after {f['down']:.2f} s; link up again: up after"
                  f" {f['up']:.2f} s")
    finally:
        if tenant_id:
            # The tenant goes once its VMs and image are gone everywhere.
            owner = api_for(urls["a"], token)
            delete_all(owner, "final")
            last = None
            for _ in range(100):
                try:
                    for image in owner.call("GET", "/v1/images"):
                        owner.call("DELETE", f"/v1/images/{image['id']}")
                    operator.call("DELETE", f"/v1/tenants/{tenant_id}")
                    break
                except (OSError, RuntimeError) as err:
                    last = err
                    time.sleep(0.2)
            else:
                print(f"cleanup: tenant {tenant_id} not deleted: {last}", file=sys.stderr)
        if not args.keep and not args.reuse:
            subprocess.run([CLUSTER_SH, "down"], check=False)


if __name__ == "__main__":
    main()
