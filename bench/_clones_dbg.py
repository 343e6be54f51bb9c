#!/usr/bin/env python3
"""Clones from a warm snapshot: prints figures, asserts nothing.

Starts a real nubis-agent (release build) on a temporary data directory,
boots one guest of the Nubis image with a NIC, waits for its first-boot
step, snapshots it while it runs, then measures through the REST API:
  - one clone: the request's own figure (`running_after_ms`: request in to
    the clone's VMM answering with its vCPU running, host side) and the
    time until its guest agent took its identity
  - N clones in one request: each one's `running_after_ms`, the wall time,
    and clones per second
  - host memory: the proportional set size (PSS, /proc/PID/smaps_rollup) of
    each idle clone's VMM against the VM that was cold-booted
Needs root, /dev/kvm and guest-images/build.sh's outputs.
Usage: bench/clones.py [--clones N] [--bin DIR] [--images DIR]
"""

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agent as agent_bench  # noqa: E402

ROOT = agent_bench.ROOT


def pss_kib(pid):
    """The proportional set size of process `pid`, in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def wait_for(what, check, timeout=300):
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout} s")


def identity_taken(api, vm):
    events = api.call("GET", f"/v1/vms/{vm}/events")
    for event in events:
        if event["kind"] == "identity_failed":
            raise RuntimeError(f"{vm}: {event['message']}")
    return any(event["kind"] == "identity" for event in events)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    args = parser.parse_args()
    images = os.path.abspath(args.images)
    process, operator, data = agent_bench.start_agent(args.bin, images)
    api = agent_bench.tenant_api(operator, "bench")
    try:
        cmdline = open(os.path.join(images, "cmdline")).read().strip()
        image = api.call("POST", "/v1/images", {
            "name": "busybox", "kernel": os.path.join(images, "vmlinux"),
            "rootfs": os.path.join(images, "rootfs.ext4"),
            "cmdline": f"{cmdline} root=/dev/vda rw nubis_cmd=\"read wait_forever\""})
        base = api.call("POST", "/v1/vms", {"name": "base", "image": image["id"], "nics": [{}],
                                            "start": True})
        booted = time.monotonic()
        wait_for("the first boot", lambda: "nubis-metadata: hostname base" in
                 api.call("GET", f"/v1/vms/{base['id']}/console"))
        booted = time.monotonic() - booted
        snapshot = api.call("POST", f"/v1/vms/{base['id']}/snapshots")
        print(agent_bench.machine_line("clones from a warm snapshot"))
        print(f"cold boot of the original to its first-boot step: {booted:.1f} s; "
              f"snapshot of 128 MiB taken while it runs ({snapshot['size_bytes'] >> 20} MiB on disk)")

        started = time.monotonic()
        one = api.call("POST", f"/v1/snapshots/{snapshot['id']}/clones",
                       {"count": 1, "name_prefix": "one"})
        answered = time.monotonic() - started
        vm = one["vms"][0]["id"]
        wait_for("the identity", lambda: identity_taken(api, vm))
        identity = time.monotonic() - started
        print(f"1 clone: vCPU running {one['running_after_ms'][0]} ms after the request "
              f"(host side), answer after {answered * 1000:.0f} ms, "
              f"guest took its identity after {identity:.2f} s")

        started = time.monotonic()
        many = api.call("POST", f"/v1/snapshots/{snapshot['id']}/clones",
                        {"count": args.clones, "name_prefix": "many"})
        wall = time.monotonic() - started
        running = many["running_after_ms"]
        print(f"{args.clones} clones in one request: vCPU running after "
              f"min {min(running)} / median {statistics.median(running):.0f} / max {max(running)} ms; "
              f"all running after {wall:.2f} s = {args.clones / wall:.1f} clones/s")
        for clone in many["vms"]:
            wait_for("the identities", lambda clone=clone: identity_taken(api, clone["id"]))
        identities = time.monotonic() - started
        print(f"every clone's guest took its identity {identities:.1f} s after the request")

        time.sleep(5)  # idle
        base_pss = pss_kib(api.call("GET", f"/v1/vms/{base['id']}")["pid"])
        clone_pss = [pss_kib(api.call("GET", f"/v1/vms/{clone['id']}")["pid"])
                     for clone in many["vms"]]
        print(f"host memory (PSS of the VMM process), idle: cold-booted VM {base_pss / 1024:.1f} MiB; "
              f"each of {args.clones} clones median {statistics.median(clone_pss) / 1024:.1f} MiB "
              f"(max {max(clone_pss) / 1024:.1f}); "
              f"{args.clones} clones together {sum(clone_pss) / 1024:.1f} MiB")
    finally:
        try:
            for vm in api.call("GET", "/v1/vms"):
                api.call("DELETE", f"/v1/vms/{vm['id']}")
        except Exception as err:  # noqa: BLE001
            print(f"cleanup: {err}", file=sys.stderr)
        os.system(f"grep -E \"VMM answering|defined\" {data}/agent.log | sed \"s/\\x1b\\[[0-9;]*m//g\" | cut -c1-330")
        process.terminate()
        process.wait()
        shutil.rmtree(data, ignore_errors=True)

if __name__ == "__main__":
    main()
