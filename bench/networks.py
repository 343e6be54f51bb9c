#!/usr/bin/env python3
"""Tenant network benchmark: prints figures, asserts nothing.

Measures between two guests on one virtual network (guest-images'
rootfs-bench.ext4, with Debian's iperf3), both with their address by DHCP
from the agent:
  - ping round trip (client to server, 20 pings)
  - iperf3 TCP throughput client to server (Mbit/s, as the receiver saw it)
in two set-ups:
  - one host: a real nubis-agent (release build), both guests on this host,
    through the network's bridge and the agent's nftables rules;
  - overlay (--overlay): two simulated hosts, each a network namespace with
    its own agent, joined by a veth underlay; the network spans both over
    VXLAN, the server runs on host B, the client on host A.
Needs root, /dev/kvm and guest-images/build.sh's outputs. On nested kvm_pvm
hosts both guests' kernels run through KVM's instruction emulator: expect
~4 minutes for the two boots and low figures.
Usage: bench/networks.py [--overlay] [--seconds N] [--bin DIR] [--images DIR]
"""

import argparse
import os
import re
import shutil
import subprocess
import time

from agent import machine_line, start_agent, tenant_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIDR, SERVER_IP = "10.91.0.0/24", "10.91.0.2"
IPERF_RE = re.compile(r"\[\s*\d+\]\s+[\d.]+-[\d.]+\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+Mbits/sec.*receiver")
PING_RE = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")
# The overlay's simulated hosts: management links from here, an underlay
# between them.
HOSTS = {"a": ("nbbencha", "10.96.1", "10.99.9.1"), "b": ("nbbenchb", "10.96.2", "10.99.9.2")}
OVERLAY_PORT = 8282


def wait_for(api, vm_id, needle, guard_s):
    start = time.monotonic()
    while True:
        console = api.call("GET", f"/v1/vms/{vm_id}/console")
        if needle in console:
            return console
        if time.monotonic() - start > guard_s:
            raise RuntimeError(f"{vm_id}: no {needle!r} after {guard_s} s:\n{console[-2000:]}")
        time.sleep(1)


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def make_hosts():
    """Two network namespaces with management links to this one and an
    underlay veth between them."""
    for netns, subnet, _ in HOSTS.values():
        subprocess.run(["ip", "netns", "del", netns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", f"{netns}m"], stderr=subprocess.DEVNULL)
        ip("netns", "add", netns)
        ip("-n", netns, "link", "set", "lo", "up")
        ip("link", "add", f"{netns}m", "type", "veth", "peer", "name", "mgmt", "netns", netns)
        ip("addr", "add", f"{subnet}.1/30", "dev", f"{netns}m")
        ip("link", "set", f"{netns}m", "up")
        ip("-n", netns, "addr", "add", f"{subnet}.2/30", "dev", "mgmt")
        ip("-n", netns, "link", "set", "mgmt", "up")
    (a, _, under_a), (b, _, under_b) = HOSTS["a"], HOSTS["b"]
    ip("-n", a, "link", "add", "under", "type", "veth", "peer", "name", "under", "netns", b)
    for netns, address in ((a, under_a), (b, under_b)):
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", "under")
        ip("-n", netns, "link", "set", "under", "up")


def remove_hosts():
    for netns, _, _ in HOSTS.values():
        subprocess.run(["ip", "netns", "del", netns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", f"{netns}m"], stderr=subprocess.DEVNULL)


def register_image(api, images):
    with open(os.path.join(images, "cmdline")) as f:
        cmdline = f.read().strip()
    api.call("POST", "/v1/images", {
        "name": "bench", "kernel": os.path.join(images, "vmlinux"),
        "rootfs": os.path.join(images, "rootfs-bench.ext4"),
        "cmdline": f"{cmdline} root=/dev/vda ro"})


def scripts(seconds):
    # iperf3 needs a writable TMPDIR (its buffers are mkstemp files) and the
    # root disk is read-only: devtmpfs is writable.
    return {
        "server": "export TMPDIR=/dev; echo SERVER_UP; iperf3 -s -1; read x",
        "client": (f"export TMPDIR=/dev; n=0; until ping -c1 -W1 {SERVER_IP} >/dev/null; do n=$((n+1)); [ $n -gt 300 ] && break; done; "
                   f"ping -c 20 -q {SERVER_IP}; n=0; "
                   f"until iperf3 -c {SERVER_IP} -t {seconds} -f m; do n=$((n+1)); [ $n -gt 30 ] && break; sleep 5; done; "
                   "echo CLIENT_DONE; read x"),
    }


def measure(server_api, client_api, network, seconds, where):
    """Boots the server (first: it gets SERVER_IP) and the client, and
    prints what the client measured."""
    vms = []
    try:
        for api, name in ((server_api, "server"), (client_api, "client")):
            vm = api.call("POST", "/v1/vms", {
                "name": name, "image": "bench", "memory_mib": 256,
                "kernel_args": f'nubis_cmd="{scripts(seconds)[name]}"',
                "nics": [{"network": network["id"]}]})
            vms.append((api, vm["id"]))
        for api, vm_id in vms:
            api.call("POST", f"/v1/vms/{vm_id}/start")
        console = wait_for(client_api, vms[1][1], "\nCLIENT_DONE", 1800)
        print(machine_line("nubis tenant network benchmark"))
        print(f"two guests (1 vCPU, 256 MiB) on one network ({CIDR}, MTU {network['mtu']}, DHCP, "
              f"nftables rules), {where}:")
        ping = PING_RE.search(console)
        if ping:
            print(f"  ping round trip, 20 pings                  min {ping.group(1):>7}  avg {ping.group(2):>7}  max {ping.group(3):>7} ms")
        else:
            print("  ping round trip: no summary line on the client's console")
        rates = IPERF_RE.findall(console)
        if rates:
            print(f"  TCP client -> server (iperf3, {seconds} s)        {float(rates[-1]):10.2f} Mbit/s")
        else:
            print("  TCP client -> server: no iperf3 receiver line on the client's console")
    finally:
        for api, vm_id in vms:
            try:
                api.call("DELETE", f"/v1/vms/{vm_id}")
            except Exception as err:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup: {vm_id}: {err}")


def one_host(args, images):
    agent, operator, data = start_agent(args.bin, images)
    api = None
    try:
        api = tenant_api(operator, "bench")
        register_image(api, images)
        network = api.call("POST", "/v1/networks", {"name": "bench", "cidr": CIDR})
        measure(api, api, network, args.seconds, f"on this host (bridge {network['bridge']})")
        api.call("DELETE", f"/v1/networks/{network['id']}")
    finally:
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)


def overlay(args, images):
    make_hosts()
    agents = {}
    try:
        for name, (netns, subnet, underlay) in HOSTS.items():
            agents[name] = start_agent(args.bin, images, netns=netns, reach=f"{subnet}.2",
                                       port=OVERLAY_PORT, underlay=underlay,
                                       token=f"bench-host-{name}-operator-token")
        # Hosts register each other by certificate fingerprint (mutual TLS).
        for here, there in (("a", "b"), ("b", "a")):
            _, _, underlay = HOSTS[there]
            fingerprint = agents[there][1].call("GET", "/v1/host-identity")["fingerprint"]
            agents[here][1].call("POST", "/v1/peers", {
                "name": there, "address": underlay, "fingerprint": fingerprint})
        operator_a, operator_b = agents["a"][1], agents["b"][1]
        client_api = tenant_api(operator_a, "bench")
        register_image(client_api, images)
        network = client_api.call("POST", "/v1/networks", {"name": "bench", "cidr": CIDR, "hosts": ["b"]})
        token_b = operator_b.call("POST", f"/v1/tenants/{network['tenant_id']}/tokens")["token"]
        server_api = type(operator_b)(operator_b.port, token_b, operator_b.host)
        register_image(server_api, images)
        measure(server_api, client_api, network, args.seconds,
                f"across two hosts over VXLAN (VNI {network['vni']}, veth underlay, server on B)")
        client_api.call("DELETE", f"/v1/networks/{network['id']}")
    finally:
        for agent, _, data in agents.values():
            agent.terminate()
            agent.wait()
            shutil.rmtree(data, ignore_errors=True)
        remove_hosts()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", action="store_true", help="across two simulated hosts")
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    args = parser.parse_args()
    images = os.path.abspath(args.images)
    (overlay if args.overlay else one_host)(args, images)


if __name__ == "__main__":
    main()
