#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ on the stable toolchain and runs each
# for SECONDS (default 30): libFuzzer comes from libfuzzer-sys (built with
# the system's C++ compiler), coverage from LLVM's sanitizer-coverage pass
# through RUSTFLAGS, so neither nightly nor cargo-fuzz is needed.
#
#   scripts/fuzz.sh [SECONDS]
#
# Prints each target's executions and executions per second (libFuzzer's
# final stats) and exits 1 if any target crashed, naming the input that
# did. The corpus grows across runs in $NUBIS_FUZZ_CORPUS/<target>
# (default /var/cache/nubis/fuzz-corpus), seeded from fuzz/seeds/<target>;
# crashing inputs go to $NUBIS_FUZZ_ARTIFACTS/<target>
# (default /var/cache/nubis/fuzz-artifacts); the build to
# $NUBIS_FUZZ_TARGET_DIR (default fuzz/target, ignored by git).
set -euo pipefail

seconds=${1:-30}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${NUBIS_FUZZ_TARGET_DIR:-$repo/fuzz/target}
corpus_root=${NUBIS_FUZZ_CORPUS:-/var/cache/nubis/fuzz-corpus}
artifact_root=${NUBIS_FUZZ_ARTIFACTS:-/var/cache/nubis/fuzz-artifacts}
command -v c++ >/dev/null || {
    echo "fuzz.sh: no C++ compiler (libFuzzer is C++): apt-get install build-essential" >&2
    exit 2
}
started=$(date +%s)

# An explicit --target keeps these flags off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --quiet --manifest-path "$repo/fuzz/Cargo.toml" \
    --target "$host" --target-dir "$target_dir" --bins
built=$(date +%s)
echo "fuzz.sh: built in $((built - started)) s; ${seconds} s per target"

failed=0
for source in "$repo"/fuzz/fuzz_targets/*.rs; do
    name=$(basename "$source" .rs)
    corpus=$corpus_root/$name
    artifacts=$artifact_root/$name
    seeds=$repo/fuzz/seeds/$name
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [[ -d $seeds ]] && dirs+=("$seeds")
    log=$(mktemp)
    status=0
    "$target_dir/$host/release/$name" -max_total_time="$seconds" -print_final_stats=1 \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$artifacts/" "${dirs[@]}" \
        >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    coverage=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    printf '%-24s %12s execs %8s exec/s  %s\n' "$name" "${execs:-?}" "${rate:-?}" "$coverage"
    if ((status != 0)); then
        failed=1
        echo "fuzz.sh: $name failed (exit $status):" >&2
        grep -E 'ERROR: libFuzzer|panicked at|Test unit written to|SUMMARY' "$log" >&2 || tail -n 30 "$log" >&2
    fi
    rm -f "$log"
done
echo "fuzz.sh: $(($(date +%s) - started)) s in all"
if ((failed)); then
    echo "fuzz.sh: a target crashed; its input is named above" >&2
    exit 1
fi
