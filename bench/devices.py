#!/usr/bin/env python3
"""Device throughput benchmark for nubis-vmm: prints figures, asserts nothing.

Boots one Linux guest per scenario (guest-images' vmlinux, rootfs-bench.ext4
read-only as /dev/vda, with Debian's fio and iperf3) and measures from inside
the guest, as many figures per boot as it can (a boot costs ~30 s on nested
kvm_pvm hosts):
  - block, on a scratch data disk (/dev/vdb, a sparse file made here), fio
    with O_DIRECT and psync: sequential write and read MiB/s (1 MiB blocks),
    4 KiB random read IOPS (queue depth 1)
  - network, on a tap device made here (172.30.0.1/24 on the host, the guest
    172.30.0.2): iperf3 TCP guest-to-host and host-to-guest Mbit/s, against
    `iperf3 -s -1` servers on the host
Scenarios: without rate limits, then (unless --no-limits) with the data disk
limited by `bw=`/`iops=` and the NIC by `bw=`/`pps=`; a table at the end shows
them side by side with the configured limits and the machine.
Needs root (tap devices), iperf3 on the host, and guest-images/build.sh's
outputs.

On nested kvm_pvm hosts every guest kernel instruction is emulated: a boot
takes ~4.5 min here (~55 s to init, ~110 s for fio to start: Debian's fio
loads 64 shared libraries from the virtio-blk root, the rest the tests), the
figures are low, and the default limits (1 MiB/s, 10 IOPS, 0.2 Mbit/s, 100
frames/s) are set below them so that they bite; pass higher ones (--disk-bw
...) on a VMX/SVM host.
Usage:
  bench/devices.py [--only block|net|all] [--no-limits|--limited-only]
                   [--disk-bw B] [--disk-iops N] [--net-bw B] [--net-pps N]
                   [--vmm PATH] [--images DIR] [--keep]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT_RE = re.compile(r"Guest-boot-time = +(\d+) us")
EXIT_RE = re.compile(r"NUBIS_EXIT_CODE=(\d+)")
# fio --output-format=terse (version 3): ';'-separated, one line per job.
TERSE_RE = re.compile(r"3;fio-[^;]*;(seqwrite|seqread|randread);.*")
# iperf3 -f m, the summary line seen by the receiving side.
IPERF_RE = re.compile(r"\[\s*\d+\]\s+[\d.]+-[\d.]+\s+sec\s+[\d.]+\s+\w?Bytes\s+([\d.]+)\s+Mbits/sec.*receiver")

HOST_IP, GUEST_IP, NETMASK = "172.30.0.1", "172.30.0.2", "255.255.255.0"
PORT_G2H, PORT_H2G = 5201, 5202

MIB = 1024 * 1024
# Default rate limits of the limited scenario (--disk-bw and friends change them):
# below what an emulated guest on a nested kvm_pvm host reaches without them,
# so that the limits are what holds the guest back; raise them on a VMX/SVM host.
DISK_BW = 1 * MIB  # bytes/s
DISK_IOPS = 10
NET_BW = 25_000  # bytes/s: 0.2 Mbit/s
NET_PPS = 100
BLOCK_KEYS = ("seq_read", "seq_write", "rand_read")
NET_KEYS = ("g2h", "h2g")

METRICS = [
    ("seq_read", "block seq read, 1 MiB, O_DIRECT", "MiB/s"),
    ("seq_write", "block seq write, 1 MiB, O_DIRECT", "MiB/s"),
    ("rand_read", "block 4 KiB random read, QD1", "IOPS"),
    ("g2h", "net TCP guest -> host (iperf3)", "Mbit/s"),
    ("h2g", "net TCP host -> guest (iperf3 -R)", "Mbit/s"),
]


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPUs, {model}"
    if os.path.exists("/sys/module/kvm_pvm"):
        text += ", nested kvm_pvm"
    return text


def vmm_features(opts, probe_file):
    """Which of --net and the rate-limit keys this nubis-vmm understands."""
    vmm = opts.vmm
    help_text = subprocess.run([vmm, "--help"], capture_output=True, text=True).stdout
    net = "--net" in help_text

    def rejects(args, words):
        # Flags are parsed before anything is opened; the kernel does not
        # exist, so an accepted flag fails later, with another message
        # (a rejected one: "invalid disk '...': unknown key 'bw' (...)").
        run = subprocess.run([vmm, "--kernel", "/nonexistent/vmlinux"] + args,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        err = run.stderr.lower()
        return any(word in err for word in words)

    disk_limits = not rejects(["--disk", f"path={probe_file},ro=on,bw={opts.disk_bw},iops={opts.disk_iops}"],
                              ["invalid disk", "unknown key", "unexpected argument"])
    net_limits = net and not rejects(["--net", f"tap=nbprobe{os.getpid() % 10000},bw={opts.net_bw},pps={opts.net_pps}"],
                                     ["invalid nic", "invalid net", "unknown key", "unexpected argument"])
    return net, disk_limits, net_limits


def run_cmd(args):
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, capture_output=True)


class Tap:
    """A persistent tap device with HOST_IP/24, deleted by close()."""

    def __init__(self):
        self.name = None
        used = subprocess.run(["ip", "-o", "addr", "show", "to", HOST_IP + "/24"],
                              capture_output=True, text=True).stdout.strip()
        if used:
            raise RuntimeError(f"{HOST_IP}/24 is already in use on this host: {used}")
        name = f"nbtap{os.getpid() % 100000}"
        try:
            run_cmd(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"cannot create tap {name} (root needed): {err.stderr.decode().strip()}")
        self.name = name
        try:
            run_cmd(["ip", "addr", "add", HOST_IP + "/24", "dev", name])
            run_cmd(["ip", "link", "set", name, "up"])
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.name:
            subprocess.run(["ip", "link", "del", self.name], capture_output=True)
            self.name = None


class IperfServer:
    """`iperf3 -s -1 -J` on HOST_IP:port; result() is the host side's Mbit/s."""

    def __init__(self, port, path):
        self.path = path
        self.out = open(path, "w")
        self.proc = subprocess.Popen(["iperf3", "-s", "-1", "-J", "-B", HOST_IP, "-p", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def stop(self, wait_s=5):
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()

    def result(self):
        try:
            with open(self.path) as f:
                doc = json.load(f)
            end = doc["end"]
            # The server fills in only its own side: received for a normal
            # test, sent for a reverse (-R) one.
            bits = end["sum_received"]["bits_per_second"] or end["sum_sent"]["bits_per_second"]
            return bits / 1e6 if bits else None
        except (OSError, ValueError, KeyError, TypeError):
            return None


def guest_command(block, net, seconds):
    parts = ["export TMPDIR=/dev", "echo NB_BEGIN"]
    if block:
        parts.append(
            "fio --thread --output-format=terse --filename=/dev/vdb --direct=1 --ioengine=psync"
            f" --size=256M --ramp_time=2 --runtime={seconds}"
            " --name=seqwrite --rw=write --bs=1M"
            " --name=seqread --stonewall --rw=read --bs=1M"
            " --name=randread --stonewall --rw=randread --bs=4k --time_based")
    if net:
        for tag, port, extra in (("g2h", PORT_G2H, ""), ("h2g", PORT_H2G, " -R")):
            parts.append(f"echo NB_NET {tag}")
            parts.append(f"iperf3 -c {HOST_IP} -p {port} -t {seconds} -f m --connect-timeout 5000{extra}")
    parts.append("echo NB_END")
    return "; ".join(parts)


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def parse_serial(text):
    figures = {}
    for match in TERSE_RE.finditer(text):
        fields = match.group(0).split(";")
        job = match.group(1)
        try:
            if job == "seqwrite":
                figures["seq_write"] = int(fields[47]) / 1024  # write bandwidth, KiB/s
            elif job == "seqread":
                figures["seq_read"] = int(fields[6]) / 1024  # read bandwidth, KiB/s
            else:
                figures["rand_read"] = float(fields[7])  # read IOPS
        except (IndexError, ValueError):
            pass
    tag = None
    for line in text.splitlines():
        if line.startswith("NB_NET "):
            tag = line.split()[1]
            continue
        match = IPERF_RE.search(line)
        if match and tag:
            figures.setdefault(tag, float(match.group(1)))
    exit_code = EXIT_RE.search(text)
    return figures, int(exit_code.group(1)) if exit_code else None


def run_scenario(opts, tmp, name, limited, block, net, tap):
    """Boots one guest for this scenario; returns (figures, notes)."""
    serial = os.path.join(tmp, f"{name}.serial")
    stderr_path = os.path.join(tmp, f"{name}.stderr")
    cmdline = opts.base_cmdline + " root=/dev/vda ro"
    args = [opts.vmm, "--kernel", os.path.join(opts.images, "vmlinux"),
            "--vcpus", str(opts.vcpus), "--memory-mib", str(opts.memory_mib),
            "--serial", "file:" + serial,
            "--disk", f"path={opts.rootfs},ro=on"]
    if block:
        data = os.path.join(tmp, "data.img")
        if os.path.exists(data):
            os.unlink(data)
        with open(data, "wb") as f:
            f.truncate(opts.disk_mib * MIB)
        disk = f"path={data}"
        if limited:
            disk += f",bw={opts.disk_bw},iops={opts.disk_iops}"
        args += ["--disk", disk]
    servers = []
    if net:
        nic = f"tap={tap.name}"
        if limited:
            nic += f",bw={opts.net_bw},pps={opts.net_pps}"
        args += ["--net", nic]
        cmdline += f" ip={GUEST_IP}::{HOST_IP}:{NETMASK}::eth0:off"
        servers = [("g2h", IperfServer(PORT_G2H, os.path.join(tmp, f"{name}.iperf-g2h.json"))),
                   ("h2g", IperfServer(PORT_H2G, os.path.join(tmp, f"{name}.iperf-h2g.json")))]
    cmdline += f' nubis_cmd="{guest_command(block, net, opts.seconds)}"'
    args += ["--cmdline", cmdline]
    env = {k: v for k, v in os.environ.items() if k != "NUBIS_LOG"}

    log(f"{name}: booting: {' '.join(args[:-1])} '...'")
    start = time.monotonic()
    notes = []
    server_wait = 0
    try:
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
            try:
                code = proc.wait(timeout=opts.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
                notes.append(f"timed out after {opts.timeout} s")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        server_wait = 5  # the servers write their JSON when the test ends
    finally:
        for _, server in servers:
            server.stop(wait_s=server_wait)
    elapsed = time.monotonic() - start

    serial_text, stderr_text = read_text(serial), read_text(stderr_path)
    figures, guest_rc = parse_serial(serial_text)
    for tag, server in servers:
        host_figure = server.result()
        if tag not in figures and host_figure is not None:
            # The guest's receiver line is the figure; the host server's JSON the fallback.
            figures[tag] = host_figure
    boot = BOOT_RE.search(stderr_text)
    figures["boot_s"] = int(boot.group(1)) / 1e6 if boot else None
    figures["wall_s"] = elapsed
    if code not in (0, None):
        notes.append(f"nubis-vmm exited {code}")
    if guest_rc not in (0, None):
        notes.append(f"guest command exited {guest_rc}")
    if guest_rc is None:
        notes.append("no NUBIS_EXIT_CODE on the console")
    expected = (list(BLOCK_KEYS) if block else []) + (list(NET_KEYS) if net else [])
    missing = [k for k in expected if k not in figures]
    if missing:
        notes.append("no figure for " + ", ".join(missing))
    if notes:
        log(f"{name}: " + "; ".join(notes))
        tail = "\n".join(stderr_text.splitlines()[-8:])
        log(f"{name}: nubis-vmm stderr (last lines):\n{tail}")
        console = [line for line in serial_text.splitlines()
                   if "NB_" in line or "fio" in line or "iperf" in line or "error" in line.lower()]
        log(f"{name}: console lines of interest:\n" + "\n".join(console[-20:]))
        log(f"{name}: full console in {serial}" if opts.keep else f"{name}: rerun with --keep for the full console")
    log(f"{name}: done in {elapsed:.1f} s")
    return figures, notes


def fmt(value, unit):
    if value is None:
        return "n/a"
    return f"{value:.0f}" if unit == "IOPS" else f"{value:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["block", "net", "all"], default="all")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-limits", action="store_true", help="skip the rate-limited scenario")
    which.add_argument("--limited-only", action="store_true", help="skip the scenario without limits")
    parser.add_argument("--disk-bw", type=int, default=DISK_BW, help="data disk limit, bytes/s")
    parser.add_argument("--disk-iops", type=int, default=DISK_IOPS, help="data disk limit, requests/s")
    parser.add_argument("--net-bw", type=int, default=NET_BW, help="NIC limit, bytes/s each direction")
    parser.add_argument("--net-pps", type=int, default=NET_PPS, help="NIC limit, frames/s each direction")
    parser.add_argument("--vmm", default=os.path.join(ROOT, "target/release/nubis-vmm"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--disk-mib", type=int, default=512, help="size of the scratch data disk")
    parser.add_argument("--seconds", type=int, default=5, help="length of each fio job and iperf3 test")
    parser.add_argument("--timeout", type=int, default=900, help="per boot, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (consoles, logs)")
    opts = parser.parse_args()

    if not os.path.exists(opts.vmm):
        sys.exit(f"bench: {opts.vmm} is missing: cargo build --release -p nubis-vmm")
    for f in ("vmlinux", "cmdline", "rootfs-bench.ext4"):
        if not os.path.exists(os.path.join(opts.images, f)):
            sys.exit(f"bench: {opts.images}/{f} is missing: guest-images/build.sh")
    with open(os.path.join(opts.images, "cmdline")) as f:
        opts.base_cmdline = f.read().strip()

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    want_block = opts.only in ("block", "all")
    want_net = opts.only in ("net", "all")
    net_ok, disk_limits_ok, net_limits_ok = vmm_features(opts, os.path.join(opts.images, "rootfs-bench.ext4"))
    skipped = []
    if want_net and not net_ok:
        skipped.append(f"network: {opts.vmm} has no --net flag (virtio-net not built in yet)")
        want_net = False
    if want_net and not shutil.which("iperf3"):
        skipped.append("network: iperf3 is not installed on the host (scripts/install-deps.sh)")
        want_net = False
    if want_net and os.geteuid() != 0:
        skipped.append("network: creating a tap device needs root")
        want_net = False
    if not (want_block or want_net):
        for line in skipped:
            log(line)
        sys.exit("bench: nothing to measure")
    limited = not opts.no_limits
    limited_block, limited_net = want_block, want_net
    if limited and want_block and not disk_limits_ok:
        skipped.append("limits: --disk does not accept bw=/iops= yet")
        limited_block = False
    if limited and want_net and not net_limits_ok:
        skipped.append("limits: --net does not accept bw=/pps= yet")
        limited_net = False
    for line in skipped:
        log(line)

    scenarios = []
    if not opts.limited_only:
        scenarios.append(("unlimited", False, want_block, want_net))
    if limited and (limited_block or limited_net):
        scenarios.append(("limited", True, limited_block, limited_net))
    if not scenarios:
        sys.exit("bench: nothing to measure")

    total_start = time.monotonic()
    results = {}
    notes = {}
    tap = None
    tmp = tempfile.mkdtemp(prefix="nubis-bench-")
    try:
        opts.rootfs = os.path.join(tmp, "rootfs-bench.ext4")
        shutil.copyfile(os.path.join(opts.images, "rootfs-bench.ext4"), opts.rootfs)
        if want_net:
            tap = Tap()
            log(f"tap {tap.name} with {HOST_IP}/24")
        for name, lim, block, net in scenarios:
            results[name], notes[name] = run_scenario(opts, tmp, name, lim, block, net, tap)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        log(f"error: {err}")
        sys.exit(1)
    finally:
        if tap:
            tap.close()
        if opts.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - total_start

    print(f"nubis-vmm device benchmark on {os.uname().nodename}: {machine()}")
    print(f"  {opts.vmm}; guest: vmlinux + rootfs-bench.ext4 (ro), {opts.vcpus} vCPU, {opts.memory_mib} MiB;"
          f" data disk: {opts.disk_mib} MiB sparse raw file; {opts.seconds} s per fio job / iperf3 test")
    disk_limit = f"bw={opts.disk_bw} B/s ({opts.disk_bw / MIB:g} MiB/s), iops={opts.disk_iops}"
    net_limit = f"bw={opts.net_bw} B/s ({opts.net_bw * 8 / 1e6:g} Mbit/s), pps={opts.net_pps}"
    columns = [(name, "no limits" if name == "unlimited" else "limited") for name in results]
    has_limited = "limited" in results
    header = f"  {'':<38} {'unit':>7}" + "".join(f" {title:>10}" for _, title in columns)
    print(header + ("  configured limit" if has_limited else ""))
    for key, label, unit in METRICS:
        is_block = key in BLOCK_KEYS
        if not (want_block if is_block else want_net):
            continue
        row = f"  {label:<38} {unit:>7}"
        for name, _ in columns:
            ran = dict((n, (b, nt)) for n, _, b, nt in scenarios)[name][0 if is_block else 1]
            row += f" {fmt(results[name].get(key), unit) if ran else 'skipped':>10}"
        if has_limited:
            row += f"  {disk_limit if is_block else net_limit}"
        print(row)
    for name in results:
        boot = results[name].get("boot_s")
        print(f"  {name} boot: {'n/a' if boot is None else f'{boot:.1f} s'} to init,"
              f" {results[name]['wall_s']:.1f} s in all"
              + (f"; problems: {'; '.join(notes[name])}" if notes[name] else ""))
    for line in skipped:
        print(f"  skipped: {line}")
    print(f"  total {total:.1f} s")


if __name__ == "__main__":
    main()
