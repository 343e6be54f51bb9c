#!/usr/bin/env python3
"""Boot benchmark for nubis-vmm: prints figures, asserts nothing.

For a null guest (a few bytes of x86 code that print to the UART and reset
the machine) and for the Linux guest images, over N runs each:
  - VMM start-up: process start to the first vCPU entry (from the VMM's log)
  - null guest: process start to the first serial byte (measured here)
  - Linux: process start to the guest's boot-timer marker (init has started)
  - VMM RSS without guest memory (RssAnon + RssFile: guest RAM is a memfd,
    counted in RssShmem), sampled when the guest reaches its marker
With --firecracker PATH (or NUBIS_BENCH_FIRECRACKER), the null guest also
boots under that Firecracker binary the same number of times, alternating
with ours, with the same definition (process start to the first serial byte
on stdout), 1 vCPU and 128 MiB as ours, and prints both medians and p90s and
the ratio ours/Firecracker. Firecracker runs with `--no-api --config-file`,
its log on stderr (by default it logs to stdout, ahead of the guest's byte)
and its seccomp filters; --firecracker-seccomp-filter FILE (or
NUBIS_BENCH_FIRECRACKER_SECCOMP) passes a compiled BPF filter instead of its
built-in one (a glibc build's built-in one is empty; see README).
Usage: bench/boot.py [--runs-null N] [--runs-linux N] [--vmm PATH] [--images DIR]
                     [--firecracker PATH [--firecracker-seccomp-filter FILE]]
"""

import argparse
import json
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


def null_guest_elf(path, firecracker=False):
    """ELF64 with: print 'N' to 0x3f8, write the boot marker, reset via the i8042.

    firecracker: the variant for Firecracker, the same up to the first serial
    byte. It leaves out the boot marker (Firecracker's boot page tables map
    only the first 1 GiB, so the write to 0xc0000000 faults, and the guest
    triple-faults: exit status 1) and spins after the reset (Firecracker
    handles the i8042 reset on its event loop while the vCPU runs on)."""
    load, offset = 0x100000, 120
    code = b"\x66\xba\xf8\x03\xb0N\xee"  # mov dx,0x3f8; mov al,'N'; out dx,al
    if not firecracker:
        code += b"\x48\xb8" + struct.pack("<Q", 0xC0000000) + b"\xc6\x00\x7b"  # boot marker
    code += b"\xb0\xfe\xe6\x64"  # mov al,0xfe; out 0x64,al
    if firecracker:
        code += b"\xeb\xfe"  # jmp $
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


def firecracker_args(binary, guest, tmp, seccomp_filter):
    """Firecracker's command line for the null guest: 1 vCPU, 128 MiB, no drives."""
    config = {
        "boot-source": {"kernel_image_path": guest, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [],
    }
    path = os.path.join(tmp, "firecracker.json")
    with open(path, "w") as out:
        json.dump(config, out)
    # Its logger writes to stdout unless told otherwise: the log goes to
    # stderr (as ours does), so that stdout's first byte is the guest's.
    args = [binary, "--no-api", "--config-file", path, "--log-path", "/dev/stderr"]
    if seccomp_filter:
        args += ["--seccomp-filter", seccomp_filter]
    return args


def is_dynamic(path):
    """True for an ELF with an interpreter (a glibc build; Firecracker's releases are static musl)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            phoff, = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def p90(values):
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def comparison(ours, theirs):
    """Prints both first-output figures (median, p90) and the ratios ours/Firecracker."""
    ours = [v for v in ours if v is not None]
    theirs = [v for v in theirs if v is not None]
    print("null guest vs Firecracker, same run, alternating (process start to first serial output):")
    if not ours or not theirs:
        print("  n/a (no serial output)")
        return
    for name, values in (("nubis-vmm", ours), ("Firecracker", theirs)):
        print(f"  {name:<12} median {statistics.median(values):7.2f}  p90 {p90(values):7.2f}"
              f"  min {min(values):7.2f}  max {max(values):7.2f} ms  (n={len(values)})")
    print(f"  ours/Firecracker: median {statistics.median(ours) / statistics.median(theirs):.2f}x"
          f"  p90 {p90(ours) / p90(theirs):.2f}x")


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
    parser.add_argument("--firecracker", default=os.environ.get("NUBIS_BENCH_FIRECRACKER"),
                        help="a Firecracker binary to boot the null guest with too, alternating with ours")
    parser.add_argument("--firecracker-seccomp-filter",
                        default=os.environ.get("NUBIS_BENCH_FIRECRACKER_SECCOMP"),
                        help="a compiled BPF filter for Firecracker's --seccomp-filter (default: its built-in one)")
    opts = parser.parse_args()
    if not os.path.exists(opts.vmm):
        sys.exit(f"bench: {opts.vmm} is missing: cargo build --release")
    if opts.firecracker and not os.path.exists(opts.firecracker):
        sys.exit(f"bench: {opts.firecracker} is missing")
    if opts.firecracker_seccomp_filter and not opts.firecracker:
        sys.exit("bench: --firecracker-seccomp-filter needs --firecracker")

    print(f"nubis-vmm boot benchmark on {os.uname().nodename} ({os.cpu_count()} CPUs), {opts.vmm}")
    with tempfile.TemporaryDirectory() as tmp:
        guest = os.path.join(tmp, "null.elf")
        null_guest_elf(guest)
        ours = [opts.vmm, "--kernel", guest, "--memory-mib", "128"]
        runs = []
        fc_runs = []
        if opts.firecracker:
            fc_guest = os.path.join(tmp, "null-firecracker.elf")
            null_guest_elf(fc_guest, firecracker=True)
            fc = firecracker_args(opts.firecracker, fc_guest, tmp, opts.firecracker_seccomp_filter)
            version = subprocess.run([opts.firecracker, "--version"], capture_output=True,
                                     text=True).stdout.splitlines()
            filter_note = opts.firecracker_seccomp_filter or "built-in"
            if not opts.firecracker_seccomp_filter and is_dynamic(opts.firecracker):
                filter_note += " (empty in a glibc build: pass --firecracker-seccomp-filter)"
            print(f"Firecracker: {opts.firecracker} ({version[0] if version else '?'}),"
                  f" seccomp filter {filter_note}")
        for _ in range(opts.runs_null):
            runs.append(run_once(ours, True))
            if opts.firecracker:
                fc_runs.append(run_once(fc, False))
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
        if fc_runs:
            comparison([r[1] for r in runs], [r[1] for r in fc_runs])

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
