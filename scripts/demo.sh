#!/usr/bin/env bash
# Quick start: installs what is needed, builds the guest images and a release
# build, and boots a demo microVM. The guest prints its kernel, CPUs and
# memory and powers off; with --shell you get a busybox shell on the console
# instead (exit it to stop the VM).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# rustup installs cargo here; a non-login shell may not have it on PATH.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-deps.sh
guest-images/build.sh
cargo build --release --bins

images=guest-images/out
command='read v < /proc/version; echo $v; read c < /sys/devices/system/cpu/online; echo CPUs online: $c; while read k v u; do [ $k = MemTotal: ] && echo Memory: $v $u; done < /proc/meminfo; echo Nubis demo VM is up'
if [ "${1:-}" = "--shell" ]; then
    cmdline="$(cat $images/cmdline)"
else
    cmdline="$(cat $images/cmdline) nubis_cmd=\"$command\""
fi
echo "demo: booting a 2-vCPU, 256 MiB microVM (about 30 s on nested KVM)" >&2
exec target/release/nubis-vmm \
    --kernel "$images/vmlinux" \
    --initrd "$images/initramfs.cpio" \
    --cmdline "$cmdline" \
    --vcpus 2 --memory-mib 256
