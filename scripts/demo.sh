#!/usr/bin/env bash
# Quick start: installs what is needed, builds the guest images and a release
# build, starts the host agent (nubis-agent) and boots a demo microVM through
# its REST API with nubisctl: a tenant, a token, an image, a VM with a disk
# and a NIC on the tenant's bridge. The agent keeps running in the
# foreground with the VM up; Ctrl-C deletes the demo VM and stops the agent.
#
#   scripts/demo.sh              agent on 127.0.0.1:8080, data in /var/lib/nubis-demo
#   NUBIS_DEMO_PORT=9090 scripts/demo.sh
#   scripts/demo.sh --vmm-only   the previous demo: one nubis-vmm, no agent
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# rustup installs cargo here; a non-login shell may not have it on PATH.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-deps.sh
guest-images/build.sh
cargo build --release --bins

images="$(pwd)/guest-images/out"
bin="$(pwd)/target/release"
command='read v < /proc/version; echo $v; read c < /sys/devices/system/cpu/online; echo CPUs online: $c; while read k v u; do [ $k = MemTotal: ] && echo Memory: $v $u; done < /proc/meminfo; s=up; echo Nubis demo VM is $s; read wait_forever'

if [ "${1:-}" = "--vmm-only" ]; then
    echo "demo: booting a 2-vCPU, 256 MiB microVM (about 30 s on nested KVM)" >&2
    exec "$bin/nubis-vmm" --kernel "$images/vmlinux" --initrd "$images/initramfs.cpio" \
        --cmdline "$(cat "$images/cmdline") nubis_cmd=\"${command%; read wait_forever}\"" \
        --vcpus 2 --memory-mib 256
fi

port="${NUBIS_DEMO_PORT:-8080}"
data="${NUBIS_DEMO_DATA:-/var/lib/nubis-demo}"
mkdir -p "$data"
export NUBIS_OPERATOR_TOKEN="${NUBIS_OPERATOR_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
export NUBIS_URL="http://127.0.0.1:$port"
printf '{"image_dirs": ["%s"]}\n' "$images" > "$data/agent.json"
# Its own session: Ctrl-C (or a TERM to this script's process group) reaches
# this script, which deletes the demo VM through the agent before stopping it.
setsid "$bin/nubis-agent" --listen "127.0.0.1:$port" --data-dir "$data" --config "$data/agent.json" \
    2> "$data/agent.log" &
agent=$!
ctl() { "$bin/nubisctl" "$@"; }
tenant_id=""
cleanup() {
    set +e
    if [ -n "$tenant_id" ]; then
        echo "demo: deleting the demo VM, image and tenant" >&2
        NUBIS_TOKEN="$token" ctl vm delete demo >/dev/null
        NUBIS_TOKEN="$token" ctl image delete busybox >/dev/null
        NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN" ctl tenant delete "$tenant_id" >/dev/null
    fi
    kill "$agent" 2>/dev/null
    wait "$agent" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in $(seq 100); do ctl health >/dev/null 2>&1 && break; sleep 0.1; done

export NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN"
tenant_id="$(ctl --json tenant create "demo-$(date +%s)" | sed 's/.*"id":"\([^"]*\)".*/\1/')"
token="$(ctl --json token create "$tenant_id" | sed 's/.*"token":"\([^"]*\)".*/\1/')"
export NUBIS_TOKEN="$token"
ctl image create busybox --kernel "$images/vmlinux" --rootfs "$images/rootfs.ext4" \
    --cmdline "$(cat "$images/cmdline") root=/dev/vda ro nubis_cmd=\"$command\"" >/dev/null
ctl vm create demo --image busybox --vcpus 2 --memory-mib 256 --disk 64 --nic "" >/dev/null
echo "demo: booting a 2-vCPU, 256 MiB microVM through the agent (about 30-40 s on nested KVM)" >&2
ctl vm start demo --wait-for "Nubis demo VM is up"
ctl vm console demo | grep -v '^\[' || true
ctl vm list
cat >&2 <<EOT

demo: the agent serves $NUBIS_URL (log: $data/agent.log); the VM runs. Try, in another shell:
  export NUBIS_URL=$NUBIS_URL NUBIS_TOKEN=$token
  $bin/nubisctl vm list
  $bin/nubisctl vm events demo
  curl -s -H "Authorization: Bearer \$NUBIS_TOKEN" $NUBIS_URL/v1/vms | head -c 300
demo: Ctrl-C deletes the demo VM and stops the agent.
EOT
wait "$agent"
