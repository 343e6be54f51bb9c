#!/usr/bin/env bash
# Checks the agent's API against its own OpenAPI document with Schemathesis,
# a client nobody here wrote: it reads /v1/openapi.json, generates requests
# valid and invalid by it, and fails on a 5xx, a status or content type the
# document does not list, a body that breaks the documented schema, a valid
# request refused (400) or an invalid one accepted, a 405 without Allow...
# (every check but ignored_auth). Why: the document is the contract clients
# are written against; a check we wrote ourselves would share our blind spots.
#
# It starts its own agent (root, like the e2e tests) in a network namespace
# of its own, so the bridges and nftables tables of the networks Schemathesis
# creates never touch the host's, with a tiny image (a bogus kernel and a
# 1 MiB root disk: VMs are created and started, and fail to boot, which must
# be a documented error too). It runs as a tenant; the host-to-host routes
# (/v1/overlay) and the operator's /v1/peers are left out. Bounded: at most
# SCHEMATHESIS_EXAMPLES cases per operation and SCHEMATHESIS_SECONDS in all.
# Exits non-zero on any failure and closes with a summary line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

examples="${SCHEMATHESIS_EXAMPLES:-60}"
seconds="${SCHEMATHESIS_SECONDS:-120}"
st=/var/cache/nubis/schemathesis/bin/st
python=/var/cache/nubis/schemathesis/bin/python

if [ "$(id -u)" != 0 ]; then
    echo "schemathesis: needs root (the agent, its network namespace)" >&2
    exit 1
fi
[ -x "$st" ] || scripts/install-deps.sh

started=$SECONDS
cargo build -q -p nubis-agent -p vmm -p nubis-jailer --bins
bin="${CARGO_TARGET_DIR:-target}/debug"
bin="$(cd "$bin" && pwd)"

work="$(mktemp -d /tmp/nubis-schemathesis.XXXXXX)"
netns="nubis-st-$$"
cgroup="nubis-schemathesis-$$"
agent_pid=""
cleanup() {
    if [ -n "$agent_pid" ]; then
        kill "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    # The VMMs the agent started outlive it by design: kill them, then
    # remove their cgroups, deepest first.
    if [ -d "/sys/fs/cgroup/$cgroup" ]; then
        find "/sys/fs/cgroup/$cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null \
            | xargs -r kill -9 2>/dev/null || true
        for _ in $(seq 50); do
            find "/sys/fs/cgroup/$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "/sys/fs/cgroup/$cgroup" ] || break
            sleep 0.1
        done
    fi
    ip netns del "$netns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$netns"
ip -n "$netns" link set lo up

mkdir -p "$work/images" "$work/data"
echo "not a kernel" > "$work/images/vmlinux"
truncate -s 1M "$work/images/rootfs.ext4"
cat > "$work/agent.json" <<EOF
{"vmm_binary": "$bin/nubis-vmm", "image_dirs": ["$work/images"],
 "parent_cgroup": "$cgroup", "stop_timeout_s": 5}
EOF
operator="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=8470
# Only the network namespace changes: `ip netns exec` would remount /sys
# and hide the cgroups the agent jails its VMMs in.
NUBIS_OPERATOR_TOKEN="$operator" nsenter --net="/run/netns/$netns" -- \
    "$bin/nubis-agent" --listen "127.0.0.1:$port" --data-dir "$work/data" \
    --config "$work/agent.json" 2> "$work/agent.log" &
agent_pid=$!

# A tenant (with room for what Schemathesis creates), its token and image.
token="$(ip netns exec "$netns" "$python" - "$port" "$operator" "$work/images" <<'EOF'
import sys, time, requests
port, operator, images = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}"
for _ in range(300):
    try:
        if requests.get(f"{base}/healthz", timeout=1).ok:
            break
    except requests.ConnectionError:
        pass
    time.sleep(0.1)
else:
    sys.exit("schemathesis: the agent did not come up")
def call(method, path, token, body=None):
    reply = requests.request(method, base + path, json=body, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    if not reply.ok:
        sys.exit(f"schemathesis: {method} {path}: {reply.status_code} {reply.text}")
    return reply.json()
quota = {"max_vcpus": 1024, "max_memory_mib": 1 << 30, "max_vms": 64,
         "max_networks": 16, "max_port_forwards": 64, "max_snapshots": 16,
         "max_storage_mib": 1 << 30}
tenant = call("POST", "/v1/tenants", operator, {"name": "schemathesis", "quota": quota})
token = call("POST", f"/v1/tenants/{tenant['id']}/tokens", operator)["token"]
call("POST", "/v1/images", token, {"name": "tiny", "kernel": f"{images}/vmlinux",
                                   "rootfs": f"{images}/rootfs.ext4"})
print(token)
EOF
)"

status=0
# From $work: Schemathesis keeps a cache in its working directory.
config="$PWD/scripts/schemathesis.toml"
(cd "$work" && ip netns exec "$netns" env HOME="$work" "$st" --config-file "$config" run "http://127.0.0.1:$port/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all --exclude-checks ignored_auth \
    --exclude-path-regex '^/v1/(overlay|peers)' \
    --max-examples "$examples" --max-time "$seconds" \
    --seed 1 --no-color \
    > "$work/st.log" 2>&1) || status=$?
cat "$work/st.log"
if grep -q "panicked\|ERROR" "$work/agent.log"; then
    echo "schemathesis: the agent logged errors:" >&2
    grep "panicked\|ERROR" "$work/agent.log" | tail -20 >&2
fi
# Schemathesis's own count: "N generated, ..." under "Test cases:".
cases="$(grep -A1 '^Test cases:' "$work/st.log" | tail -1 | sed 's/^ *//' || true)"
echo "schemathesis: ${cases:-no count}; exit $status in $((SECONDS - started)) s"
exit "$status"
