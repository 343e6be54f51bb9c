#!/usr/bin/env bash
# Three hosts on one machine: installs what is needed, builds the guest images
# and a release build (as scripts/demo.sh does), then simulates three hosts
# with network namespaces and runs on each an etcd member and a nubis-agent in
# cluster mode (every host compute and controller, labelled with a zone, a
# fault domain and an update domain). Through host-a's API, with nubisctl, it
# creates a tenant, a token, an image, a network of the cluster and three
# started VMs in one anti-affinity group (one per host), then lists the hosts
# and the VMs through the other hosts. It stays in the foreground; Ctrl-C (or
# a TERM) deletes the demo resources and tears everything down: agents, VMMs,
# etcd, namespaces, links, cgroups, the state directory.
#
#   scripts/cluster.sh                         the demo, in the foreground
#   scripts/cluster.sh up [--no-demo]          the same, left running; writes DIR/cluster.env
#   scripts/cluster.sh down                    tears down what `up` left running
#   scripts/cluster.sh start-agent HOST        starts HOST's agent again (after a kill)
#   options of the first two: --lease-ttl SECONDS (default 10, the agent's)
#
# The simulated hosts (names chosen not to collide with the tests' nbv*/nbk*
# namespaces, 10.97.x and 10.98.47.x, nor bench/networks.py's 10.96.x):
#   host-a, host-b, host-c   namespaces nubis-cl-a, -b, -c
#   management link          veth nubis-cl-X here 10.95.N.1/30 <-> mgmt 10.95.N.2/30 there:
#                            this namespace reaches each agent's API at http://10.95.N.2:8080
#   underlay                 a bridge in namespace nubis-cl-net, each host plugged in as
#                            10.94.0.N/24 (its veth "under"; the bridge's port is port-X):
#                            etcd's peer and client traffic, the agents' peer channel, VXLAN
#   etcd                     one member per host on its underlay address, TLS with client
#                            certificates both ways (a CA made here with openssl)
# Environment: NUBIS_CLUSTER_DIR (state, default /var/lib/nubis-cluster),
# NUBIS_BIN_DIR (the binaries, default $CARGO_TARGET_DIR or target, /release).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# rustup installs cargo here; a non-login shell may not have it on PATH.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

die() { echo "cluster: error: $*" >&2; exit 1; }
log() { echo "cluster: $*" >&2; }

hosts=(a b c)
state="${NUBIS_CLUSTER_DIR:-/var/lib/nubis-cluster}"
images="$(pwd)/guest-images/out"
bin="${NUBIS_BIN_DIR:-${CARGO_TARGET_DIR:-$(pwd)/target}/release}"
bin="$(realpath -m "$bin")"
api_port=8080
underlay_ns=nubis-cl-net
demo_cidr=10.72.0.0/24

# Per host X (a, b, c, index N = 1, 2, 3).
index() { case "$1" in a) echo 1 ;; b) echo 2 ;; c) echo 3 ;; *) die "no host $1 (a, b or c)" ;; esac; }
netns() { echo "nubis-cl-$1"; }
reach() { echo "10.95.$(index "$1").2"; }
underlay() { echo "10.94.0.$(index "$1")"; }
url() { echo "http://$(reach "$1"):$api_port"; }
# Each agent's VMMs get a cgroup and a uid range of their own (the agents share
# this machine's cgroup hierarchies and users), above the default range
# (900000 + 65536) that a standalone agent or the tests use.
cgroup() { echo "nubis-cl-$1"; }
uid_first() { echo $((1100000 + 10000 * ($(index "$1") - 1))); }
in_ns() { local ns="$1"; shift; nsenter --net="/run/netns/$ns" -- "$@"; }
ctl() { "$bin/nubisctl" "$@"; }

usage() { sed -n '13,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

command="${1:-}"
case "$command" in
    ""|--*) command=demo ;;
    up|down|start-agent) shift ;;
    -h|help) usage ;;
    *) usage ;;
esac
lease_ttl=10
demo=yes
owned=no
if [ "$command" = start-agent ]; then
    [ $# = 1 ] || usage
    target_host="$1"
    index "$target_host" >/dev/null
    shift
fi
while [ $# -gt 0 ]; do
    case "$1" in
        --no-demo) demo=no ;;
        --lease-ttl) [ $# -ge 2 ] || usage; lease_ttl="$2"; shift ;;
        *) usage ;;
    esac
    shift
done
[ "$command" = demo ] && [ "$demo" = no ] && die "--no-demo is for 'up' (the foreground mode is the demo)"

[ "$(id -u)" = 0 ] || die "run it as root (sudo scripts/cluster.sh): it makes network namespaces, cgroups and KVM guests"

# --- processes: pid files in the state directory, checked before a kill ---

# Whether pid file $1 names a live process still running $2 (a pid can be
# reused once its process is gone).
alive() {
    local pid
    [ -f "$1" ] && pid="$(cat "$1")" && [ -n "$pid" ] || return 1
    { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "$2"
}

# Stops the process of pid file $1 (running $2): TERM, then KILL after $3 s.
stop() {
    local file="$1" what="$2" patience="$3" pid
    alive "$file" "$what" || { rm -f "$file"; return 0; }
    pid="$(cat "$file")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((patience * 10))); do
        alive "$file" "$what" || break
        sleep 0.1
    done
    alive "$file" "$what" && kill -KILL "$pid" 2>/dev/null
    for _ in $(seq 50); do alive "$file" "$what" || break; sleep 0.1; done
    rm -f "$file"
}

# --- bring-up ---

make_network() {
    log "making the hosts' namespaces, management links and the underlay bridge"
    ip netns add "$underlay_ns"
    ip -n "$underlay_ns" link set lo up
    ip -n "$underlay_ns" link add br0 type bridge
    ip -n "$underlay_ns" link set br0 up
    local h ns n
    for h in "${hosts[@]}"; do
        ns="$(netns "$h")" n="$(index "$h")"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip link add "$ns" type veth peer name mgmt netns "$ns"
        ip addr add "10.95.$n.1/30" dev "$ns"
        ip link set dev "$ns" up
        ip -n "$ns" addr add "10.95.$n.2/30" dev mgmt
        ip -n "$ns" link set mgmt up
        ip -n "$ns" link add under type veth peer name "port-$h" netns "$underlay_ns"
        ip -n "$ns" addr add "$(underlay "$h")/24" dev under
        ip -n "$ns" link set under up
        ip -n "$underlay_ns" link set dev "port-$h" master br0 up
    done
}

make_pki() {
    log "making a CA and each host's certificate (openssl)"
    local pki="$state/pki" h
    mkdir -p "$pki"
    chmod 700 "$pki"
    openssl req -x509 -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 30 \
        -subj "/CN=nubis cluster.sh etcd CA" -keyout "$pki/ca-key.pem" -out "$pki/ca.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        2>/dev/null
    for h in "${hosts[@]}"; do
        openssl req -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=host-$h" \
            -keyout "$pki/$h-key.pem" -out "$pki/$h.csr" 2>/dev/null
        # Server and client: the member serves etcd with it, the member and
        # the host's agent present it to the other members.
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' \
            "$(underlay "$h")" > "$pki/$h.ext"
        openssl x509 -req -in "$pki/$h.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca-key.pem" \
            -CAcreateserial -days 30 -extfile "$pki/$h.ext" -out "$pki/$h.pem" 2>/dev/null
        rm -f "$pki/$h.csr" "$pki/$h.ext"
    done
}

etcd_endpoints() {
    local h list=()
    for h in "${hosts[@]}"; do list+=("https://$(underlay "$h"):2379"); done
    (IFS=,; echo "${list[*]}")
}

etcdctl_in() {
    local h="$1"; shift
    in_ns "$(netns "$h")" env ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" \
        --cacert "$state/pki/ca.pem" --cert "$state/pki/$h.pem" --key "$state/pki/$h-key.pem" \
        --command-timeout=5s "$@"
}

start_etcd() {
    log "starting etcd: one member per host, TLS with client certificates"
    local h initial=() pki="$state/pki"
    for h in "${hosts[@]}"; do initial+=("$h=https://$(underlay "$h"):2380"); done
    for h in "${hosts[@]}"; do
        mkdir -p "$state/$h"
        local address
        address="$(underlay "$h")"
        # Its own session: a Ctrl-C reaches this script, which stops it.
        setsid nsenter --net="/run/netns/$(netns "$h")" -- etcd --name "$h" \
            --data-dir "$state/$h/etcd" --logger zap \
            --listen-client-urls "https://$address:2379,https://127.0.0.1:2379" \
            --advertise-client-urls "https://$address:2379" \
            --listen-peer-urls "https://$address:2380" \
            --initial-advertise-peer-urls "https://$address:2380" \
            --initial-cluster "$(IFS=,; echo "${initial[*]}")" \
            --initial-cluster-state new --initial-cluster-token nubis-cluster-sh \
            --client-cert-auth --trusted-ca-file "$pki/ca.pem" \
            --cert-file "$pki/$h.pem" --key-file "$pki/$h-key.pem" \
            --peer-client-cert-auth --peer-trusted-ca-file "$pki/ca.pem" \
            --peer-cert-file "$pki/$h.pem" --peer-key-file "$pki/$h-key.pem" \
            < /dev/null > "$state/$h/etcd.log" 2>&1 &
        echo $! > "$state/$h/etcd.pid"
    done
    for _ in $(seq 600); do
        etcdctl_in a endpoint health > /dev/null 2>&1 && return 0
        for h in "${hosts[@]}"; do
            alive "$state/$h/etcd.pid" etcd || { tail -n 20 "$state/$h/etcd.log" >&2; die "etcd on host-$h exited"; }
        done
        sleep 0.1
    done
    tail -n 20 "$state/a/etcd.log" >&2
    die "etcd did not become healthy within 60 s (logs: $state/*/etcd.log)"
}

write_agent_config() {
    local h="$1" labels
    # Capacity as configured, not measured: the three agents share one machine.
    printf '{"image_dirs": ["%s"], "vmm_binary": "%s", "parent_cgroup": "%s", "jail_uid_first": %s, "jail_uid_count": 10000, "capacity": {"vcpus": 8, "memory_mib": 4096, "disk_mib": 20480}}\n' \
        "$images" "$bin/nubis-vmm" "$(cgroup "$h")" "$(uid_first "$h")" > "$state/$h/agent.json"
    case "$h" in
        a) labels=zone=sim,fault-domain=1,update-domain=1 ;;
        b) labels=zone=sim,fault-domain=2,update-domain=2 ;;
        c) labels=zone=sim,fault-domain=3,update-domain=1 ;;
    esac
    printf '%s\n' "$labels" > "$state/$h/labels"
}

# Starts host $1's agent (again: same data directory, same settings).
launch_agent() {
    local h="$1" pki="$state/pki"
    . "$state/cluster.env"
    setsid nsenter --net="/run/netns/$(netns "$h")" -- env NUBIS_OPERATOR_TOKEN="$NUBIS_OPERATOR_TOKEN" \
        "$bin/nubis-agent" --listen "0.0.0.0:$api_port" --data-dir "$state/$h/data" \
        --config "$state/$h/agent.json" --underlay-address "$(underlay "$h")" \
        --cluster "etcd=$(etcd_endpoints)" --etcd-ca "$pki/ca.pem" \
        --etcd-cert "$pki/$h.pem" --etcd-key "$pki/$h-key.pem" \
        --host-name "host-$h" --labels "$(cat "$state/$h/labels")" --roles compute,controller \
        --lease-ttl "$NUBIS_CLUSTER_LEASE_TTL" \
        < /dev/null >> "$state/$h/agent.log" 2>&1 &
    echo $! > "$state/$h/agent.pid"
}

wait_agent() {
    local h="$1"
    for _ in $(seq 300); do
        NUBIS_URL="$(url "$h")" ctl health > /dev/null 2>&1 && return 0
        alive "$state/$h/agent.pid" nubis-agent || break
        sleep 0.1
    done
    tail -n 20 "$state/$h/agent.log" >&2
    die "host-$h's agent did not answer (log: $state/$h/agent.log)"
}

# Waits until every host is up and one is the controller, as host $1 sees it.
wait_hosts() {
    local via="$1" listed
    for _ in $(seq 600); do
        listed="$(NUBIS_URL="$(url "$via")" NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN" ctl --json host list 2>&1 || true)"
        if [ "$(grep -o '"state":"up"' <<<"$listed" | wc -l)" = "${#hosts[@]}" ] &&
            grep -q '"controller":true' <<<"$listed"; then
            return 0
        fi
        sleep 0.1
    done
    echo "$listed" >&2
    for h in "${hosts[@]}"; do echo "--- host-$h's agent log (end) ---" >&2; tail -n 15 "$state/$h/agent.log" >&2; done
    die "the three hosts did not come up with a controller within 60 s"
}

write_env() {
    local h
    umask 077
    {
        echo "NUBIS_CLUSTER_DIR=$state"
        echo "NUBIS_BIN_DIR=$bin"
        echo "NUBIS_IMAGES=$images"
        echo "NUBIS_CLUSTER_HOSTS=$(IFS=,; echo "${hosts[*]}")"
        echo "NUBIS_CLUSTER_LEASE_TTL=$lease_ttl"
        echo "NUBIS_OPERATOR_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        echo "NUBIS_URL=$(url a)"
        for h in "${hosts[@]}"; do
            local upper="${h^^}"
            echo "NUBIS_URL_$upper=$(url "$h")"
            echo "NUBIS_NETNS_$upper=$(netns "$h")"
            echo "NUBIS_UNDERLAY_$upper=$(underlay "$h")"
            echo "NUBIS_UNDERLAY_PORT_$upper=port-$h"
        done
        echo "NUBIS_UNDERLAY_NETNS=$underlay_ns"
        echo "NUBIS_ETCD_ENDPOINTS=$(etcd_endpoints)"
    } > "$state/cluster.env"
    umask 022
}

up() {
    [ -e /dev/kvm ] || die "/dev/kvm does not exist: the hosts' VMs need KVM"
    if [ -e "$state/cluster.env" ] || ip netns list | grep -qw "$underlay_ns"; then
        die "a cluster is already up (or was left over): scripts/cluster.sh down first"
    fi
    scripts/install-deps.sh
    guest-images/build.sh
    # Honours CARGO_TARGET_DIR; NUBIS_BIN_DIR points the rest at other binaries.
    cargo build --release --bins
    for tool in nubis-agent nubis-vmm nubis-jailer nubisctl; do
        [ -x "$bin/$tool" ] || die "$bin/$tool is missing (NUBIS_BIN_DIR?)"
    done
    for tool in ip nsenter setsid etcd etcdctl openssl; do
        command -v "$tool" > /dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
    done
    started=$(date +%s.%N)
    # From here on a failure or a Ctrl-C has something of ours to tear down.
    owned=yes
    mkdir -p "$state"
    write_env
    . "$state/cluster.env"
    make_network
    make_pki
    start_etcd
    log "starting the three agents (cluster mode, lease TTL ${lease_ttl} s)"
    local h
    for h in "${hosts[@]}"; do
        write_agent_config "$h"
        launch_agent "$h"
    done
    for h in "${hosts[@]}"; do wait_agent "$h"; done
    wait_hosts b
    log "three hosts up after $(elapsed) s"
}

elapsed() { echo "$(date +%s.%N) $started" | awk '{printf "%.1f", $1 - $2}'; }

# --- the demo ---

demo_command() {
    local n="$1" next=$(($1 % 3 + 2))
    # web-N is 10.72.0.(N+1) (addresses are drawn in creation order); it pings
    # the next one, which runs on another host, over the network's VXLAN.
    echo "echo Nubis cluster demo: web-$n is up; n=0; until ping -c1 -W1 10.72.0.$next >/dev/null; do n=\$((n+1)); [ \$n -gt 120 ] && break; done; echo Nubis cluster demo: web-$n pinged 10.72.0.$next after \$n failures; read wait_forever"
}

run_demo() {
    . "$state/cluster.env"
    local tenant_id token n vm
    export NUBIS_URL="$NUBIS_URL_A" NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN"
    log "through host-a: a tenant, a token, an image, a network and three VMs (anti-affinity group web)"
    tenant_id="$(ctl --json tenant create "demo-$(date +%s)" | sed 's/.*"id":"\([^"]*\)".*/\1/')"
    token="$(ctl --json token create "$tenant_id" | sed 's/.*"token":"\([^"]*\)".*/\1/')"
    # Recorded at once: teardown deletes what exists of the demo.
    printf 'DEMO_TENANT=%s\nDEMO_TOKEN=%s\n' "$tenant_id" "$token" > "$state/demo.env"
    chmod 600 "$state/demo.env"
    export NUBIS_TOKEN="$token"
    ctl image create busybox --kernel "$images/vmlinux" --rootfs "$images/rootfs.ext4" \
        --cmdline "$(cat "$images/cmdline") root=/dev/vda ro" > /dev/null
    ctl network create lan --cidr "$demo_cidr" > /dev/null
    for n in 1 2 3; do
        ctl vm create "web-$n" --image busybox --memory-mib 128 --nic network=lan \
            --anti-affinity web --start --kernel-args "nubis_cmd=\"$(demo_command "$n")\"" > /dev/null
    done
    local running=0
    for _ in $(seq 1200); do
        running="$(ctl --json vm list --state running 2>/dev/null | grep -o '"state":"running"' | wc -l || true)"
        [ "$running" = 3 ] && break
        sleep 0.1
    done
    [ "$running" = 3 ] || { ctl vm list >&2; die "the demo VMs did not all run within 120 s"; }
    log "three VMs running (their VMMs answer) after $(elapsed) s; the guests boot on"
    echo
    echo "\$ nubisctl vm list        # through host-c"
    NUBIS_URL="$NUBIS_URL_C" ctl vm list
    # Their addresses on the demo network, as host-c shows them.
    for vm in web-1 web-2 web-3; do
        echo "$vm: $(NUBIS_URL="$NUBIS_URL_C" ctl --json vm show "$vm" | grep -o '"address":"[^"]*"' | tr '\n' ' ')"
    done
    echo
    log "waiting for the guests' lines, read through host-b (forwarded to their hosts; ~1-3 min on nested KVM)"
    local console
    for vm in web-1 web-2 web-3; do
        for _ in $(seq 600); do
            console="$(NUBIS_URL="$NUBIS_URL_B" ctl vm console "$vm" || true)"
            grep -q "^Nubis cluster demo: $vm pinged" <<<"$console" && break
            sleep 1
        done
        grep "^Nubis cluster demo: $vm" <<<"$console" || log "$vm: no line from its guest yet"
    done
    echo
    echo "\$ nubisctl host list      # through host-b"
    NUBIS_URL="$NUBIS_URL_B" NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN" ctl host list
    log "demo up after $(elapsed) s"
    cat >&2 <<EOT

cluster: three hosts (namespaces $(netns a), $(netns b), $(netns c)), each with an etcd member and an agent;
  APIs: $NUBIS_URL_A $NUBIS_URL_B $NUBIS_URL_C (logs: $state/*/agent.log)
  the demo tenant's token and the operator's are in $state/demo.env and $state/cluster.env. Try:
  export NUBIS_URL=$NUBIS_URL_C NUBIS_TOKEN=$token
  $bin/nubisctl vm list
  $bin/nubisctl vm console web-1
  NUBIS_TOKEN=\$(sed -n 's/^NUBIS_OPERATOR_TOKEN=//p' $state/cluster.env) $bin/nubisctl host list
EOT
}

# --- teardown: whatever exists of it, in any state ---

# Runs a command quietly; says what failed.
try() { local out; out="$("$@" 2>&1)" || log "${*:2}: $out"; }

delete_demo() {
    [ -f "$state/demo.env" ] || return 0
    . "$state/demo.env"
    . "$state/cluster.env"
    bin="$NUBIS_BIN_DIR"
    local h via="" vm
    for h in "${hosts[@]}"; do
        if NUBIS_URL="$(url "$h")" ctl health > /dev/null 2>&1; then via="$(url "$h")"; break; fi
    done
    [ -n "$via" ] || { log "no agent answers: the demo's VMMs are killed below"; return 0; }
    log "deleting the demo VMs, network, image and tenant"
    export NUBIS_URL="$via"
    export NUBIS_TOKEN="$DEMO_TOKEN"
    for vm in web-1 web-2 web-3; do try ctl vm delete "$vm"; done
    try ctl network delete lan
    try ctl image delete busybox
    # The tenant goes once no host holds anything of it (its hosts let go
    # of their holdings a moment after their last resource).
    local refused=""
    for _ in $(seq 50); do
        if refused="$(NUBIS_TOKEN="$NUBIS_OPERATOR_TOKEN" ctl tenant delete "$DEMO_TENANT" 2>&1)"; then
            refused=""
            break
        fi
        sleep 0.2
    done
    [ -z "$refused" ] || log "the demo tenant stays (etcd goes with the cluster): $refused"
    rm -f "$state/demo.env"
}

# Pids of the processes in host $1's VMM cgroups, in every hierarchy.
jailed_pids() {
    local dir
    for dir in /sys/fs/cgroup /sys/fs/cgroup/*; do
        [ -d "$dir/$(cgroup "$1")" ] && find "$dir/$(cgroup "$1")" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -u
}

remove_cgroups() {
    local dir
    for dir in /sys/fs/cgroup /sys/fs/cgroup/*; do
        [ -d "$dir/$(cgroup "$1")" ] || continue
        # Deepest first; a cgroup stays busy a moment after its last process.
        for _ in $(seq 50); do
            find "$dir/$(cgroup "$1")" -depth -type d -exec rmdir {} + 2>/dev/null
            [ -d "$dir/$(cgroup "$1")" ] || break
            sleep 0.1
        done
    done
}

teardown() {
    set +e
    [ -d "$state" ] || [ -n "$(ip netns list | grep -w "$underlay_ns")" ] || return 0
    [ -f "$state/cluster.env" ] && delete_demo
    log "stopping the agents, their VMMs and etcd; removing the namespaces and links"
    local h pid
    for h in "${hosts[@]}"; do stop "$state/$h/agent.pid" nubis-agent 15; done
    # An agent leaves its VMMs running by design (they outlive its restarts).
    for h in "${hosts[@]}"; do
        for pid in $(jailed_pids "$h"); do kill -KILL "$pid" 2>/dev/null; done
    done
    for h in "${hosts[@]}"; do
        for _ in $(seq 50); do [ -z "$(jailed_pids "$h")" ] && break; sleep 0.1; done
        remove_cgroups "$h"
    done
    for h in "${hosts[@]}"; do stop "$state/$h/etcd.pid" etcd 10; done
    for h in "${hosts[@]}"; do
        ip netns del "$(netns "$h")" 2>/dev/null
        ip link del "$(netns "$h")" 2>/dev/null
    done
    ip netns del "$underlay_ns" 2>/dev/null
    # Nothing should be mounted there (jails live in their VMMs' mount
    # namespaces); a stray mount would keep rm from the files below it.
    grep -q " $state/" /proc/mounts && awk -v s="$state/" 'index($2, s) == 1 {print $2}' /proc/mounts |
        sort -r | xargs -r umount -l
    rm -rf "$state"
    log "torn down"
}

case "$command" in
    demo)
        trap '[ "$owned" = yes ] && teardown' EXIT
        trap 'exit 130' INT TERM
        up
        run_demo
        log "Ctrl-C deletes the demo and tears the cluster down"
        # The agents and etcd are this script's children: wait returns when a
        # trapped signal arrives (or they all exit).
        wait
        ;;
    up)
        # A failed bring-up leaves nothing; a good one leaves it running.
        trap 'rc=$?; [ $rc = 0 ] || [ "$owned" != yes ] || teardown; exit $rc' EXIT
        trap 'exit 130' INT TERM
        up
        [ "$demo" = yes ] && run_demo
        log "left running; environment in $state/cluster.env; scripts/cluster.sh down tears it down"
        ;;
    down)
        teardown
        ;;
    start-agent)
        [ -f "$state/cluster.env" ] || die "no cluster is up ($state/cluster.env is missing)"
        . "$state/cluster.env"
        bin="$NUBIS_BIN_DIR"
        alive "$state/$target_host/agent.pid" nubis-agent && die "host-$target_host's agent runs"
        launch_agent "$target_host"
        wait_agent "$target_host"
        ;;
esac
