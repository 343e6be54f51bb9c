#!/usr/bin/env bash
# Runs the end-to-end test binaries (tests/tests/*.rs) in two lanes at once,
# then the few that must run alone.
#
# Why: a Linux boot here is CPU-bound in KVM's instruction emulator, but many
# tests spend much of their run waiting (a guest's `sleep`, a migration's
# rounds, an agent's restart), so one binary at a time leaves a core idle for
# a good part of the suite. Two lanes keep both cores busy.
#
# Lane "agents": every binary that runs an agent (agent_*, and those named
#   in AGENT_TESTS), one after another. Agents in this network namespace own
#   the host's tenant bridges, nftables tables and DHCP port: only one may
#   run here at a time (tests/src/agent.rs).
# Lane "vmm": every other binary, one after another. They use their own taps
#   and addresses (172.31.x), never the agent's names or tables.
# BALANCE names VMM-level binaries that run in the agents lane instead, so
# that both lanes take about as long.
# Alone: the binaries in ALONE run one after another once both lanes are
#   done. cluster_services keeps four Linux guests serving and probed at
#   once; with the other lane booting guests beside it, its guests starved
#   for minutes (a boot took over 240 s) and so did the other lane's.
#
# Each binary's output is printed whole when it ends, then a summary with
# every binary's time; the exit status is 1 if any binary failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

logs="$(mktemp -d /tmp/nubis-e2e.XXXXXX)"
trap 'rm -rf "$logs"' EXIT

# The programs under test (the test binaries run target/debug/nubis-*), then
# the test binaries, built once: "name path" per line.
cargo build --workspace --bins
cargo test -p nubis-tests --no-run --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    target = message.get("target", {})
    if message.get("reason") == "compiler-artifact" and target.get("kind") == ["test"] \
            and message.get("executable"):
        print(target["name"], message["executable"])
' | sort > "$logs/binaries"
[ -s "$logs/binaries" ] || { echo "e2e: no test binaries were built" >&2; exit 1; }

run_lane() {
    local lane="$1"
    shift
    local name path started status
    for name in "$@"; do
        path="$(awk -v n="$name" '$1 == n { print $2 }' "$logs/binaries")"
        started=$SECONDS
        status=0
        # The working directory cargo gives a test: its package's.
        # One test at a time in each lane: with 2 cores, more guests at once
        # starve each other (a Linux guest starved that way for minutes was
        # seen to hang in its boot).
        # A hang that no test guards fails its binary instead of stalling CI.
        (cd tests && timeout --kill-after 30 "$BINARY_TIME_LIMIT" \
            "$path" --color never --test-threads 1) > "$logs/$name.log" 2>&1 || status=$?
        [ "$status" = 124 ] && echo "e2e: $name did not finish within $BINARY_TIME_LIMIT s" >> "$logs/$name.log"
        echo "$name $status $((SECONDS - started)) $lane" >> "$logs/summary"
        {
            flock 9
            echo "     Running tests/$name.rs ($lane lane, $((SECONDS - started)) s)"
            cat "$logs/$name.log"
        } 9> "$logs/print.lock"
    done
}

# Seconds one test binary may take (the slowest take ~12 min here).
BINARY_TIME_LIMIT="${NUBIS_E2E_BINARY_TIME_LIMIT:-1800}"
AGENT_TESTS="tenant_boundary compromised_vmm"
BALANCE="nubis_run"
in_agents_lane() { [[ "$1" == agent_* || " $AGENT_TESTS $BALANCE " == *" $1 "* ]]; }
ALONE="cluster_services"
runs_alone() { [[ " $ALONE " == *" $1 "* ]]; }
agents=()
others=()
alone=()
while read -r name _; do
    if runs_alone "$name"; then
        alone+=("$name")
    elif in_agents_lane "$name"; then
        agents+=("$name")
    else
        others+=("$name")
    fi
done < "$logs/binaries"
run_lane agents "${agents[@]}" &
agents_lane=$!
run_lane vmm "${others[@]}" &
vmm_lane=$!
wait "$agents_lane" "$vmm_lane"
run_lane alone "${alone[@]}"

ran="$(wc -l < "$logs/summary")"
expected="$(wc -l < "$logs/binaries")"
[ "$ran" = "$expected" ] || { echo "e2e: only $ran of $expected test binaries ran" >&2; exit 1; }

echo
echo "end-to-end test binaries (status, seconds, lane):"
sort "$logs/summary" | awk '{ printf "  %-24s %-4s %5s s  %s\n", $1, ($2 == 0 ? "ok" : "FAIL"), $3, $4 }'
failed="$(awk '$2 != 0 { print $1 }' "$logs/summary" | sort | tr '\n' ' ')"
# The closing line CI reads: test binaries that passed and failed.
echo "e2e: $(awk '$2 == 0' "$logs/summary" | wc -l) passed, $(awk '$2 != 0' "$logs/summary" | wc -l) failed"
if [ -n "$failed" ]; then
    echo "e2e: failed: $failed" >&2
    exit 1
fi
