#!/usr/bin/env python3
"""Boot benchmark for nubis-vmm: prints figures, asserts nothing.

For a null guest (a few bytes of x86 code that print to the UART and reset
the machine) and for the Linux guest images, over N runs each:
  - VMM start-up: process start to the first vCPU entry (from the VMM's log)
  - null guest: process start to the first serial byte (measured here)
  - Linux: process start to the guest's boot-timer marker (init has started)
  - VMM RSS without guest memory (RssAnon + RssFile: guest RAM is a memfd,
    counted in RssShmem), sampled when the guest reaches its marker
Usage: bench/boot.py [--runs-null N] [--runs-linux N] [--vmm PATH] [--images DIR]
"""

import argparse
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_RE = re.compile(r"vCPU 0 entering the guest \((\d+) us after process start\)")
BOOT_RE = re.compile(r"Guest-boot-time = +(\d+) us")
PHASES_RE = re.compile(r"start-up: (.*)")
PHASE_RE = re.compile(r"(.+) \+([0-9.]+) ms")


def null_guest_elf(path):
    """ELF64 with: print 'N' to 0x3f8, write the boot marker, reset via the i8042."""
    load, offset = 0x100000, 120
    code = b"\x66\xba\xf8\x03\xb0N\xee"  # mov dx,0x3f8; mov al,'N'; out dx,al
    code += b"\x48\xb8" + struct.pack("<Q", 0xC0000000) + b"\xc6\x00\x7b"  # boot marker
    code += b"\xb0\xfe\xe6\x64"  # mov al,0xfe; out 0x64,al
    total = offset + len(code)
    header = b"\x7fELF\x02\x01\x01\x00" + b"\0" * 8
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, load + offset, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 7, 0, load, load, total, total, 0x1000)
    with open(path, "wb") as out:
        out.write(header + program + code)


def rss_without_guest_kib(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        return None
    try:
        return int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])
    except (KeyError, ValueError):
        return None


def run_once(args, wait_marker):
    """Runs one VM; returns (startup_us, first_output_ms, boot_us, rss_kib, phases).

    phases: [(name, ms)] from the VMM's "start-up:" line, each the time since
    the previous mark (the first since main() started)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    first_output_ms = (time.monotonic() - start) * 1000 if first else None
    rss = None
    stderr_lines = []
    # The marker line arrives on stderr; sample RSS as soon as it does.
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        stderr_lines.append(line)
        if "Guest-boot-time" in line and rss is None:
            rss = rss_without_guest_kib(proc.pid)
    proc.stdout.read()
    code = proc.wait(timeout=600)
    log = "".join(stderr_lines)
    if code != 0:
        sys.exit(f"bench: VM exited {code}:\n{log}")
    startup = STARTUP_RE.search(log)
    boot = BOOT_RE.search(log)
    if wait_marker and not boot:
        sys.exit(f"bench: no boot-timer marker in the log:\n{log}")
    phases = []
    found = PHASES_RE.search(log)
    if found:
        for step in found.group(1).split(", "):
            matched = PHASE_RE.fullmatch(step.strip())
            if matched:
                phases.append((matched.group(1), float(matched.group(2))))
    return (int(startup.group(1)) if startup else None, first_output_ms,
            int(boot.group(1)) if boot else None, rss, phases)


def phase_breakdown(runs):
    """Median of each start-up phase over the runs, in the VMM's order."""
    names = []
    values = {}
    for run in runs:
        for name, ms in run[4]:
            if name not in values:
                names.append(name)
                values[name] = []
            values[name].append(ms)
    for name in names:
        summary(f"  {name}", values[name], "ms")


def summary(name, values, unit, scale=1.0):
    values = [v * scale for v in values if v is not None]
    if not values:
        print(f"  {name:<44} n/a")
        return
    print(f"  {name:<44} min {min(values):9.2f}  median {statistics.median(values):9.2f}"
          f"  max {max(values):9.2f} {unit}  (n={len(values)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-null", type=int, default=20)
    parser.add_argument("--runs-linux", type=int, default=3)
    parser.add_argument("--vmm", default=os.path.join(ROOT, "target/release/nubis-vmm"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    opts = parser.parse_args()
    if not os.path.exists(opts.vmm):
        sys.exit(f"bench: {opts.vmm} is missing: cargo build --release")

    print(f"nubis-vmm boot benchmark on {os.uname().nodename} ({os.cpu_count()} CPUs), {opts.vmm}")
    with tempfile.TemporaryDirectory() as tmp:
        guest = os.path.join(tmp, "null.elf")
        null_guest_elf(guest)
        runs = [run_once([opts.vmm, "--kernel", guest, "--memory-mib", "128"], True)
                for _ in range(opts.runs_null)]
        print("null guest (1 vCPU, 128 MiB):")
        summary("VMM start-up (process start to vCPU entry)", [r[0] for r in runs], "ms", 1e-3)
        summary("process start to first serial output", [r[1] for r in runs], "ms")
        summary("VMM RSS without guest memory", [r[3] for r in runs], "MiB", 1 / 1024)
        print("  where the start-up goes (median per step; the first from main()):")
        phase_breakdown(runs)
        # Before main(): exec, the dynamic loader, Rust's runtime set-up.
        # What the first serial byte took beyond the VMM's own first entry
        # is that plus the guest's few instructions and the pipe.
        outside = [r[1] - r[0] / 1000 for r in runs if r[0] is not None and r[1] is not None]
        summary("first output minus VMM's first entry", outside, "ms")

    if opts.runs_linux > 0:
        with open(os.path.join(opts.images, "cmdline")) as f:
            base_cmdline = f.read().strip()
        cmdline = base_cmdline + ' nubis_cmd="true"'
        args = [opts.vmm, "--kernel", os.path.join(opts.images, "vmlinux"),
                "--initrd", os.path.join(opts.images, "initramfs.cpio"),
                "--cmdline", cmdline, "--memory-mib", "128"]
        runs = [run_once(args, True) for _ in range(opts.runs_linux)]
        print("Linux guest (guest-images vmlinux + initramfs, 1 vCPU, 128 MiB):")
        summary("VMM start-up (process start to vCPU entry)", [r[0] for r in runs], "ms", 1e-3)
        summary("process start to boot-timer marker", [r[2] for r in runs], "s", 1e-6)
        summary("VMM RSS without guest memory", [r[3] for r in runs], "MiB", 1 / 1024)

        args = [opts.vmm, "--kernel", os.path.join(opts.images, "vmlinux"),
                "--disk", "path=" + os.path.join(opts.images, "rootfs.ext4") + ",ro=on",
                "--cmdline", base_cmdline + ' root=/dev/vda ro nubis_cmd="true"', "--memory-mib", "128"]
        runs = [run_once(args, True) for _ in range(opts.runs_linux)]
        print("Linux guest (vmlinux, rootfs.ext4 read-only on virtio-blk, 1 vCPU, 128 MiB):")
        summary("process start to boot-timer marker", [r[2] for r in runs], "s", 1e-6)
        summary("VMM RSS without guest memory", [r[3] for r in runs], "MiB", 1 / 1024)


if __name__ == "__main__":
    main()
