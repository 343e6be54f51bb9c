#!/usr/bin/env python3
"""Seccomp filter for a glibc build of Firecracker, for bench/boot.py.

Firecracker ships seccomp policies only for its musl targets; a build for
x86_64-unknown-linux-gnu gets an empty (allow-all) built-in filter. This
takes the x86_64 musl policy from a Firecracker source tree, adds the few
rules that glibc needs on the null guest's path (found with strace: the
first SIGSYS each time), compiles it with that tree's seccompiler-bin, and
writes the BPF file for `bench/boot.py --firecracker-seccomp-filter`.

Usage: bench/firecracker_glibc_filter.py FIRECRACKER_SRC OUT.bpf
(FIRECRACKER_SRC after `cargo build --release -p seccompiler --bin seccompiler-bin`)
"""

import json
import os
import subprocess
import sys

WHY = "glibc build, not in the musl policy (nubis bench/firecracker_glibc_filter.py): "

# For the "vmm" (main) thread: the vCPU and API threads needed none.
GLIBC_VMM_RULES = [
    {"syscall": "getpid", "comment": WHY + "glibc's pthread_kill"},
    {"syscall": "tgkill", "comment": WHY + "pthread_kill kicks the vCPUs (glibc's SIGRTMIN is 34)",
     "args": [{"index": 2, "type": "dword", "op": "eq", "val": 34,
               "comment": "sigrtmin() + vcpu::VCPU_RTSIG_OFFSET"}]},
    {"syscall": "epoll_wait", "comment": WHY + "glibc's epoll_wait"},
    {"syscall": "futex", "comment": WHY + "glibc's pthread_join",
     "args": [{"index": 1, "type": "dword", "op": "eq", "val": 265,
               "comment": "FUTEX_WAIT_BITSET|FUTEX_CLOCK_REALTIME"}]},
]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], os.path.abspath(sys.argv[2])
    with open(os.path.join(src, "resources/seccomp/x86_64-unknown-linux-musl.json")) as f:
        policy = json.load(f)
    policy["vmm"]["filter"] += GLIBC_VMM_RULES
    policy_path = os.path.splitext(out)[0] + ".json"
    with open(policy_path, "w") as f:
        json.dump(policy, f, indent=4)
    compiler = os.path.join(src, "build/cargo_target/release/seccompiler-bin")
    subprocess.run([compiler, "--target-arch", "x86_64", "--input-file", policy_path,
                    "--output-file", out], check=True)
    print(f"{out} (policy {policy_path})")


if __name__ == "__main__":
    main()
