#!/usr/bin/env python3
"""Where is a stuck Linux guest? Samples its vCPUs through the VMM's control socket.

For a guest that stops making progress: pauses the VM, snapshots it into a
scratch directory, prints each vCPU's RIP (as kernel symbol+offset, from
`nm VMLINUX`), flags, MP state and the kernel return addresses found on its
stack, then resumes it. Repeats SAMPLES times, a second apart, so a loop
shows as the same few places. The guest is not changed.

Usage: scripts/guest-backtrace.py CONTROL_SOCKET VMLINUX [SAMPLES]
"""

import bisect
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

STATE_HEADER_LEN = 8 + 4 + 8 + 32  # magic, format version, length, SHA-256
KERNEL_TEXT = (0xFFFFFFFF81000000, 0xFFFFFFFF84000000)
KERNEL_MAP = 0xFFFFFFFF80000000  # kernel image: physical + this
DIRECT_MAP = 0xFFFF888000000000  # all of RAM: physical + this


def control(path, request):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        conn.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    if not answer.get("ok"):
        sys.exit(f"guest-backtrace: {request['command']}: {answer}")
    return answer


def symbols(vmlinux):
    table = []
    listing = subprocess.run(["nm", vmlinux], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            table.append((int(parts[0], 16), parts[2]))
    table.sort()
    return table


def name(table, address):
    index = bisect.bisect_right([a for a, _ in table], address) - 1
    if index < 0:
        return hex(address)
    start, symbol = table[index]
    return f"{symbol}+{address - start:#x}"


def physical(virtual):
    if virtual >= KERNEL_MAP:
        return virtual - KERNEL_MAP
    if virtual >= DIRECT_MAP:
        return virtual - DIRECT_MAP
    return None


def sample(socket_path, table, scratch):
    control(socket_path, {"command": "pause"})
    try:
        control(socket_path, {"command": "snapshot", "dir": scratch})
    finally:
        control(socket_path, {"command": "resume"})
    with open(os.path.join(scratch, "state"), "rb") as state_file:
        state = json.loads(state_file.read()[STATE_HEADER_LEN:])
    with open(os.path.join(scratch, "memory"), "rb") as memory:
        for index, vcpu in enumerate(state["vcpus"]):
            regs = struct.unpack("<18Q", bytes(vcpu["regs"][:144]))
            rsp, rip, rflags = regs[6], regs[16], regs[17]
            print(f"  vcpu{index}: rip {name(table, rip)} ({rip:#x}) rflags {rflags:#x} "
                  f"IF={rflags >> 9 & 1} mp_state {vcpu['mp_state']}")
            stack = physical(rsp)
            if stack is None:
                continue
            memory.seek(stack)
            data = memory.read(8 * 512)
            for offset in range(0, len(data) - 7, 8):
                value = struct.unpack_from("<Q", data, offset)[0]
                if KERNEL_TEXT[0] <= value < KERNEL_TEXT[1]:
                    print(f"      {name(table, value)}")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    socket_path, vmlinux = sys.argv[1], sys.argv[2]
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    table = symbols(vmlinux)
    for number in range(samples):
        with tempfile.TemporaryDirectory(prefix="nubis-backtrace-") as scratch:
            print(f"sample {number + 1}:")
            sample(socket_path, table, os.path.join(scratch, "snapshot"))
        time.sleep(1)


if __name__ == "__main__":
    main()
