#!/usr/bin/env bash
# Installs what Nubis needs on a Debian 12 x86_64 host: the guest-image
# build's packages (Debian's kernel source, busybox-static, a kernel
# toolchain, e2fsprogs; fio and iperf3 for the benchmark rootfs and the
# host side of bench/devices.py; nftables for the agent's tenant network
# rules; python3-venv for Schemathesis, which scripts/schemathesis.sh runs
# against the API; etcd (server and etcdctl), whose members the cluster
# tests start, and protoc with protobuf's own .proto files, which the
# etcd-client crate's build needs; openssl, with which scripts/cluster.sh
# makes its etcd certificates; dash, the `sh` that `nubisctl host rollout`
# runs its restart command with, Essential in Debian but named here) and
# checks for the Rust toolchain. Idempotent: it calls
# apt only when a package is missing, and pip only when the pinned
# Schemathesis changed.
set -euo pipefail

packages=(
    linux-source-6.1 busybox-static
    build-essential bc flex bison libelf-dev libssl-dev
    e2fsprogs cpio lz4 xz-utils file python3 python3-venv musl-tools
    fio iperf3 iproute2 iputils-ping
    nftables
    etcd-server etcd-client protobuf-compiler libprotobuf-dev openssl
    dash
)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Schemathesis in a venv of Debian's python3 (not whichever python3 is
# first on PATH), at the versions pinned in scripts/schemathesis-requirements.txt.
venv=/var/cache/nubis/schemathesis
requirements="$(dirname "${BASH_SOURCE[0]}")/schemathesis-requirements.txt"
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
    echo "install-deps: installing Schemathesis into $venv" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust) is not installed" >&2; exit 1; }

if [ ! -e /dev/kvm ]; then
    echo "install-deps: warning: /dev/kvm does not exist; VMs cannot run on this machine" >&2
fi
