#!/usr/bin/env python3
"""`nubis run -- true`, cold and warm, side by side: prints figures, asserts nothing.

Cold: a fresh boot each run (no --warm). Warm: --warm with a warm cache of
its own (a first, untimed run saves the snapshot; each timed run restores
it). For each, over N runs: the wall time of the whole `nubis run` process
and, from `nubis run -v`, the time until the guest started the command.
The VMM's own share of a warm run (process start to the restored vCPU's
first entry) is read from the VMM's log in a kept run directory.

Usage: bench/run.py [--cold N] [--warm N] [--nubis PATH] [--images DIR]
"""

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED_RE = re.compile(r"command started after ([0-9.]+) ms")
ENTRY_RE = re.compile(r"vCPU 0 entering the guest \((\d+) us after process start\)")


def run_once(nubis, env, warm):
    """One `nubis run -v [--warm] -- true`: (wall s, started ms, vmm entry ms)."""
    args = [nubis, "run", "-v"] + (["--warm"] if warm else []) + ["--", "true"]
    start = time.monotonic()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"bench/run.py: {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    started = STARTED_RE.search(done.stderr)
    entry = None
    for log in glob.glob(os.path.join(env["TMPDIR"], "nubis-run-*", "vmm.log")):
        with open(log) as text:
            found = ENTRY_RE.search(text.read())
        if found:
            entry = int(found.group(1)) / 1000
        shutil.rmtree(os.path.dirname(log), ignore_errors=True)
    return wall, float(started.group(1)) if started else None, entry


def summary(values, unit, scale=1.0):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return f"median {statistics.median(values):.1f} {unit} (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=2, help="cold runs (a Linux boot each)")
    parser.add_argument("--warm", type=int, default=5, help="warm runs")
    parser.add_argument("--nubis", default=os.path.join(ROOT, "target/release/nubis"))
    parser.add_argument("--images", default=os.path.join(ROOT, "guest-images/out"))
    args = parser.parse_args()
    if not os.path.exists(args.nubis):
        sys.exit(f"bench/run.py: {args.nubis} is missing: cargo build --release")

    scratch = tempfile.mkdtemp(prefix="nubis-bench-run-")
    env = dict(os.environ, NUBIS_GUEST_IMAGES=args.images, TMPDIR=scratch,
               NUBIS_RUN_CACHE=os.path.join(scratch, "cache"), NUBIS_RUN_KEEP="1")
    try:
        cold = [run_once(args.nubis, env, warm=False) for _ in range(args.cold)]
        run_once(args.nubis, env, warm=True)  # saves the warm snapshot
        warm = [run_once(args.nubis, env, warm=True) for _ in range(args.warm)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("nubis run -- true (1 vCPU, 256 MiB, Nubis guest image)")
    print(f"{'':24} {'cold':>44}   {'warm':>44}")
    rows = [
        ("wall time", [r[0] for r in cold], [r[0] for r in warm], "s", 1.0),
        ("until command started", [r[1] for r in cold], [r[1] for r in warm], "ms", 1.0),
        ("VMM start to vCPU entry", [r[2] for r in cold], [r[2] for r in warm], "ms", 1.0),
    ]
    for name, cold_values, warm_values, unit, scale in rows:
        print(f"{name:24} {summary(cold_values, unit, scale):>44}   {summary(warm_values, unit, scale):>44}")
    cold_wall = statistics.median([r[0] for r in cold]) if cold else None
    warm_wall = statistics.median([r[0] for r in warm]) if warm else None
    if cold_wall and warm_wall:
        print(f"warm is {cold_wall / warm_wall:.1f}x faster in wall time")


if __name__ == "__main__":
    main()
