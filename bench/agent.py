#!/usr/bin/env python3
"""Host agent benchmark: prints figures, asserts nothing.

Starts a real nubis-agent (release build) on a temporary data directory and
measures, through its REST API:
  - read latency (GET /v1/vms, p50/p99) idle, and under load from N local
    client threads (the load generator), with the request rate reached
  - provisioning N VMs at once: each thread creates a VM, starts it and polls
    its console until the guest's init prints its marker; per VM the create
    and start request latencies and the time to the marker, and the wall time
    until all N are up
Needs root, /dev/kvm and guest-images/build.sh's outputs.
Usage: bench/agent.py [--vms N] [--clients N] [--requests N] [--bin DIR] [--images DIR]
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATOR = "bench-operator-token-0123456789"
MARKER = "BENCH_VM_UP"


class Api:
    def __init__(self, port, token, host="127.0.0.1"):
        self.port, self.token, self.host = port, token, host

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        if response.getheader("Content-Type", "").startswith("application/json") and data:
            return json.loads(data)
        return data.decode("utf-8", "replace")


# The agent's default port-forward range: its API port may not be in it.
FORWARD_RANGE = range(30000, 40000)


def free_port():
    """A free port outside the agent's port-forward range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in FORWARD_RANGE:
            return port


def start_agent(bin_dir, images, netns=None, reach="127.0.0.1", port=None, underlay=None,
                token=OPERATOR):
    """A nubis-agent on a free port and a fresh data directory, allowed to use
    `images`; returns (process, operator Api, data directory) once it answers.
    With `netns` it runs inside that network namespace as another host,
    listening on all of its addresses at `port` and reached at `reach`."""
    data = tempfile.mkdtemp(prefix="nubis-bench-agent-")
    port = port or free_port()
    with open(os.path.join(data, "agent.json"), "w") as config:
        json.dump({"image_dirs": [images], "vmm_binary": os.path.join(bin_dir, "nubis-vmm")}, config)
    log = open(os.path.join(data, "agent.log"), "w")
    listen = f"0.0.0.0:{port}" if netns else f"127.0.0.1:{port}"
    command = [os.path.join(bin_dir, "nubis-agent"), "--listen", listen, "--data-dir", data,
               "--config", os.path.join(data, "agent.json")]
    if underlay:
        command += ["--underlay-address", underlay]
    if netns:
        command = ["ip", "netns", "exec", netns] + command
    agent = subprocess.Popen(command, env=dict(os.environ, NUBIS_OPERATOR_TOKEN=token), stderr=log)
    operator = Api(port, token, reach)
    for _ in range(200):
        try:
            operator.call("GET", "/healthz")
            break
        except OSError:
            time.sleep(0.05)
    return agent, operator, data


def tenant_api(operator, name):
    """A tenant with room for benchmark VMs, and an Api with its token."""
    tenant = operator.call("POST", "/v1/tenants", {"name": name, "quota": {
        "max_vcpus": 64, "max_memory_mib": 65536, "max_vms": 64}})
    token = operator.call("POST", f"/v1/tenants/{tenant['id']}/tokens")["token"]
    return Api(operator.port, token, operator.host)


def machine_line(what):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    nested = " nested kvm_pvm" if os.path.exists("/sys/module/kvm_pvm") else ""
    return f"{what} on {os.uname().nodename}: {os.cpu_count()} CPUs, {cpu}{nested}"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency_line(name, samples_ms):
    return (f"  {name:44s} p50 {percentile(samples_ms, 0.5):7.2f}  p99 {percentile(samples_ms, 0.99):7.2f}"
            f"  max {max(samples_ms):7.2f} ms  (n={len(samples_ms)})")


def timed_reads(api, count):
    samples = []
    for _ in range(count):
        start = time.monotonic()
        api.call("GET", "/v1/vms")
        samples.append((time.monotonic() - start) * 1000)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300, help="per client under load")
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    args = parser.parse_args()
    images = os.path.abspath(args.images)
    agent, operator, data = start_agent(args.bin, images)
    vm_ids = []
    try:
        api = tenant_api(operator, "bench")
        with open(os.path.join(images, "cmdline")) as f:
            cmdline = f.read().strip()
        api.call("POST", "/v1/images", {
            "name": "busybox", "kernel": os.path.join(images, "vmlinux"),
            "rootfs": os.path.join(images, "rootfs.ext4"),
            "cmdline": f'{cmdline} root=/dev/vda ro nubis_cmd="echo {MARKER}; read wait_forever"'})

        print(machine_line("nubis-agent benchmark"))
        print("API read latency (GET /v1/vms):")
        print(latency_line("idle, one client", timed_reads(api, 300)))
        results, lock = [], threading.Lock()

        def reader():
            samples = timed_reads(api, args.requests)
            with lock:
                results.extend(samples)
        threads = [threading.Thread(target=reader) for _ in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        print(latency_line(f"under load, {args.clients} clients", results)
              + f", {len(results) / wall:.0f} req/s")

        print(f"provisioning {args.vms} VMs at once (1 vCPU, 128 MiB, root disk clone, rootfs boot):")
        rows, errors = [], []

        def provision(index):
            try:
                t0 = time.monotonic()
                vm = api.call("POST", "/v1/vms", {"name": f"vm{index}", "image": "busybox", "memory_mib": 128})
                with lock:
                    vm_ids.append(vm["id"])
                t1 = time.monotonic()
                api.call("POST", f"/v1/vms/{vm['id']}/start")
                t2 = time.monotonic()
                while "\n" + MARKER not in api.call("GET", f"/v1/vms/{vm['id']}/console"):
                    if time.monotonic() - t2 > 600:
                        raise RuntimeError(f"{vm['id']}: no marker after 600 s")
                    time.sleep(0.2)
                t3 = time.monotonic()
                with lock:
                    rows.append(((t1 - t0) * 1000, (t2 - t1) * 1000, t3 - t0))
            except Exception as err:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(err))
        threads = [threading.Thread(target=provision, args=(i,)) for i in range(args.vms)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        for error in errors:
            print(f"  error: {error}")
        if rows:
            create, start_ms, up = zip(*rows)
            print(f"  create request                               median {statistics.median(create):8.1f} ms")
            print(f"  start request (VMM up, control socket ok)    median {statistics.median(start_ms):8.1f} ms")
            print(f"  create to guest init marker                  min {min(up):6.1f}  median {statistics.median(up):6.1f}  max {max(up):6.1f} s")
            print(f"  all {len(rows)} VMs up after                          {wall:.1f} s")
    finally:
        for vm_id in vm_ids:
            try:
                api.call("DELETE", f"/v1/vms/{vm_id}")
            except Exception as err:  # noqa: BLE001
                print(f"cleanup: {vm_id}: {err}", file=sys.stderr)
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
