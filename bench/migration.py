#!/usr/bin/env python3
"""Snapshot and live-migration benchmark: prints figures, asserts nothing.

Uses purpose-built guests (x86 code in a tiny ELF, written here) that print a
counter byte to the serial port on every pass, so that the pause a guest sees
is measured from the guest's side: the host timestamps the console output of
the source and of the destination VMM, and the gap between the source's last
byte and the destination's first is the downtime the guest showed.
  - idle: counts with a delay loop, writing one byte of RAM per pass;
  - writer: on every pass also writes one word in each page of a buffer of a
    quarter of its RAM (it dirties pages as fast as the vCPU can).
For each guest with 256 MiB and 1 GiB of RAM: live migration between two VMM
processes on this host over TCP (total time from the request to the source's
exit, the downtime the source reports, the gap the console shows, rounds and
bytes from the source's log), then snapshot (pause + snapshot request) and
restore (process start to the first console byte).
Needs root and /dev/kvm, and a release build (cargo build --release).
Usage: bench/migration.py [--bin DIR] [--sizes 256,1024]
"""

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time

from agent import machine_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = 0x10_0000
COUNTER = 0x20_0000
BUFFER = 0x100_0000
TOKEN = "bench-migration-token-0123456789"
# The migration's key (64 hex digits): the VMMs seal the stream with it.
KEY = os.urandom(32).hex()


def elf(code):
    """The code as an ELF64 executable loaded at 1 MiB (as tests/src/guest.rs)."""
    offset = 64 + 56
    entry = LOAD + offset
    total = offset + len(code)
    header = b"\x7fELF\x02\x01\x01\x00" + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 7, 0, LOAD, LOAD, total, total, 0x1000)
    return header + program + code


def counter_prologue():
    # mov dx, 0x3f8; mov rbx, COUNTER
    return b"\x66\xba\xf8\x03" + b"\x48\xbb" + struct.pack("<Q", COUNTER)


def count_and_print():
    # mov al, [rbx]; inc al; mov [rbx], al; out dx, al
    return b"\x8a\x03\xfe\xc0\x88\x03\xee"


def idle_guest(delay=20000):
    code = bytearray(counter_prologue())
    top = len(code)
    code += count_and_print()
    code += b"\xb9" + struct.pack("<I", delay) + b"\xe2\xfe"  # mov ecx, delay; loop $
    code += b"\xeb" + struct.pack("<b", top - (len(code) + 2))
    return elf(bytes(code))


def writer_guest(pages):
    code = bytearray(counter_prologue())
    top = len(code)
    code += b"\x48\xbf" + struct.pack("<Q", BUFFER)  # mov rdi, BUFFER
    code += b"\xb9" + struct.pack("<I", pages)  # mov ecx, pages
    fill = len(code)
    code += b"\x48\x89\x0f"  # mov [rdi], rcx
    code += b"\x48\x81\xc7\x00\x10\x00\x00"  # add rdi, 4096
    code += b"\xe2" + struct.pack("<b", fill - (len(code) + 2))  # loop fill
    code += count_and_print()
    code += b"\xe9" + struct.pack("<i", top - (len(code) + 5))  # jmp top
    return elf(bytes(code))


class Vmm:
    """A nubis-vmm whose console bytes are timestamped as they arrive."""

    def __init__(self, binary, args, env=None):
        self.process = subprocess.Popen([binary] + args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=dict(os.environ, **(env or {})))
        self.first = self.last = None
        self.bytes = 0
        self.log = b""
        threading.Thread(target=self._console, daemon=True).start()
        threading.Thread(target=self._log, daemon=True).start()

    def _console(self):
        while True:
            chunk = self.process.stdout.read1(65536)
            if not chunk:
                return
            now = time.monotonic()
            self.first = self.first or now
            self.last = now
            self.bytes += len(chunk)

    def _log(self):
        for line in self.process.stderr:
            self.log += line

    def wait_for_output(self, guard=60):
        start = time.monotonic()
        while self.first is None:
            if time.monotonic() - start > guard or self.process.poll() is not None:
                raise RuntimeError("no console output:\n" + self.log.decode(errors="replace"))
            time.sleep(0.005)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def control(path, request):
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall((json.dumps(request) + "\n").encode())
                data = b""
                while not data.endswith(b"\n"):
                    part = s.recv(65536)
                    if not part:
                        break
                    data += part
                return json.loads(data)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_args(kernel, mib, sock):
    return ["--kernel", kernel, "--memory-mib", str(mib), "--serial", "stdout", "--control-socket", sock]


def migrate_once(binary, kernel, mib, work):
    source = Vmm(binary, base_args(kernel, mib, os.path.join(work, "src.sock")))
    port = free_port()
    dest = Vmm(binary, base_args(kernel, mib, os.path.join(work, "dst.sock")) + ["--migrate-listen", f"127.0.0.1:{port}"],
               env={"NUBIS_MIGRATION_TOKEN": TOKEN, "NUBIS_MIGRATION_KEY": KEY})
    try:
        source.wait_for_output()
        time.sleep(2)
        start = time.monotonic()
        answer = control(os.path.join(work, "src.sock"), {"command": "migrate", "to": f"127.0.0.1:{port}", "token": TOKEN, "key": KEY})
        if not answer.get("ok"):
            raise RuntimeError(f"migrate refused: {answer}")
        source.process.wait(timeout=600)
        total = time.monotonic() - start
        dest.wait_for_output()
        log = source.log.decode(errors="replace")
        reported = re.search(r"guest paused (\d+) ms", log)
        rounds = re.search(r"handing over after (\d+) round\(s\): (\d+) dirty pages", log)
        gap = (dest.first - source.last) * 1000 if source.last and dest.first else float("nan")
        return {
            "total_s": total,
            "downtime_ms": int(reported.group(1)) if reported else None,
            "gap_ms": gap,
            "rounds": int(rounds.group(1)) if rounds else None,
            "final_pages": int(rounds.group(2)) if rounds else None,
        }
    finally:
        source.kill()
        dest.kill()


def snapshot_once(binary, kernel, mib, work):
    sock = os.path.join(work, "snap.sock")
    snap = os.path.join(work, "snap")
    vm = Vmm(binary, base_args(kernel, mib, sock))
    try:
        vm.wait_for_output()
        time.sleep(1)
        start = time.monotonic()
        control(sock, {"command": "pause"})
        answer = control(sock, {"command": "snapshot", "dir": snap})
        create = time.monotonic() - start
        if not answer.get("ok"):
            raise RuntimeError(f"snapshot refused: {answer}")
    finally:
        vm.kill()
    start = time.monotonic()
    restored = Vmm(binary, base_args(kernel, mib, os.path.join(work, "restored.sock")) + ["--restore", snap])
    try:
        restored.wait_for_output()
        restore = restored.first - start
    finally:
        restored.kill()
    size = sum(os.stat(os.path.join(snap, f)).st_blocks * 512 for f in os.listdir(snap))
    return create, restore, size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    parser.add_argument("--sizes", default="256,1024")
    args = parser.parse_args()
    binary = os.path.join(args.bin, "nubis-vmm")
    print(machine_line("nubis snapshot and migration benchmark"))
    print("two VMM processes on this host over TCP; downtime: reported by the source / the gap in the guest's console stream")
    with tempfile.TemporaryDirectory(prefix="nubis-bench-migration-") as work:
        for mib in [int(size) for size in args.sizes.split(",")]:
            guests = {"idle": idle_guest(), "writer": writer_guest(mib * 256 // 4)}
            for name, image in guests.items():
                kernel = os.path.join(work, f"{name}.elf")
                with open(kernel, "wb") as f:
                    f.write(image)
                m = migrate_once(binary, kernel, mib, work)
                print(f"  migrate {name:6s} {mib:5d} MiB: total {m['total_s']:7.2f} s  downtime {m['downtime_ms']} ms "
                      f"(console gap {m['gap_ms']:.0f} ms)  rounds {m['rounds']}  last-round pages {m['final_pages']}")
            kernel = os.path.join(work, "idle.elf")
            create, restore, size = snapshot_once(binary, kernel, mib, work)
            print(f"  snapshot idle   {mib:5d} MiB: create {create * 1000:7.1f} ms  restore to first output {restore * 1000:7.1f} ms  "
                  f"on disk {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
