#!/usr/bin/env python3
"""Tenant network benchmark: prints figures, asserts nothing.

Starts a real nubis-agent (release build), creates a virtual network and two
VMs on it (guest-images' rootfs-bench.ext4, with Debian's iperf3), both with
their address by DHCP from the agent, and measures between the two guests on
this host, through the network's bridge and the agent's nftables rules:
  - ping round trip (client to server, 20 pings)
  - iperf3 TCP throughput client to server (Mbit/s, as the receiver saw it)
Needs root, /dev/kvm and guest-images/build.sh's outputs. On nested kvm_pvm
hosts both guests' kernels run through KVM's instruction emulator: expect
~4 minutes for the two boots and low figures.
Usage: bench/networks.py [--seconds N] [--bin DIR] [--images DIR]
"""

import argparse
import os
import re
import shutil
import time

from agent import machine_line, start_agent, tenant_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIDR, SERVER_IP = "10.91.0.0/24", "10.91.0.2"
IPERF_RE = re.compile(r"\[\s*\d+\]\s+[\d.]+-[\d.]+\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+Mbits/sec.*receiver")
PING_RE = re.compile(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")


def wait_for(api, vm_id, needle, guard_s):
    start = time.monotonic()
    while True:
        console = api.call("GET", f"/v1/vms/{vm_id}/console")
        if needle in console:
            return console
        if time.monotonic() - start > guard_s:
            raise RuntimeError(f"{vm_id}: no {needle!r} after {guard_s} s:\n{console[-2000:]}")
        time.sleep(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration")
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    args = parser.parse_args()
    images = os.path.abspath(args.images)
    agent, operator, data = start_agent(args.bin, images)
    api, vm_ids = None, []
    try:
        api = tenant_api(operator, "bench")
        with open(os.path.join(images, "cmdline")) as f:
            cmdline = f.read().strip()
        api.call("POST", "/v1/images", {
            "name": "bench", "kernel": os.path.join(images, "vmlinux"),
            "rootfs": os.path.join(images, "rootfs-bench.ext4"),
            "cmdline": f"{cmdline} root=/dev/vda ro"})
        network = api.call("POST", "/v1/networks", {"name": "bench", "cidr": CIDR})
        # iperf3 needs a writable TMPDIR (its buffers are mkstemp files) and
        # the root disk is read-only: devtmpfs is writable.
        scripts = {
            "server": "export TMPDIR=/dev; echo SERVER_UP; iperf3 -s -1; read x",
            "client": (f"export TMPDIR=/dev; n=0; until ping -c1 -W1 {SERVER_IP} >/dev/null; do n=$((n+1)); [ $n -gt 300 ] && break; done; "
                       f"ping -c 20 -q {SERVER_IP}; n=0; "
                       f"until iperf3 -c {SERVER_IP} -t {args.seconds} -f m; do n=$((n+1)); [ $n -gt 30 ] && break; sleep 5; done; "
                       "echo CLIENT_DONE; read x"),
        }
        for name in ("server", "client"):
            vm = api.call("POST", "/v1/vms", {
                "name": name, "image": "bench", "memory_mib": 256,
                "kernel_args": f'nubis_cmd="{scripts[name]}"',
                "nics": [{"network": network["id"]}]})
            vm_ids.append(vm["id"])
        for vm_id in vm_ids:
            api.call("POST", f"/v1/vms/{vm_id}/start")
        console = wait_for(api, vm_ids[1], "\nCLIENT_DONE", 1800)
        print(machine_line("nubis tenant network benchmark"))
        print(f"two guests (1 vCPU, 256 MiB) on one network ({CIDR}, bridge {network['bridge']}, "
              f"DHCP, nftables rules) on this host:")
        ping = PING_RE.search(console)
        if ping:
            print(f"  ping round trip, 20 pings                  min {ping.group(1):>7}  avg {ping.group(2):>7}  max {ping.group(3):>7} ms")
        else:
            print("  ping round trip: no summary line on the client's console")
        rates = IPERF_RE.findall(console)
        if rates:
            print(f"  TCP client -> server (iperf3, {args.seconds} s)        {float(rates[-1]):10.2f} Mbit/s")
        else:
            print("  TCP client -> server: no iperf3 receiver line on the client's console")
    finally:
        for vm_id in vm_ids:
            try:
                api.call("DELETE", f"/v1/vms/{vm_id}")
            except Exception as err:  # noqa: BLE001 - cleanup goes on
                print(f"cleanup: {vm_id}: {err}")
        if api is not None:
            try:
                for network in api.call("GET", "/v1/networks"):
                    api.call("DELETE", f"/v1/networks/{network['id']}")
            except Exception as err:  # noqa: BLE001
                print(f"cleanup: networks: {err}")
        agent.terminate()
        agent.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
