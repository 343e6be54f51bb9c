#!/usr/bin/env bash
# Runs the whole test suite: formatting and lints, unit tests, and the
# end-to-end tests that boot real guests on KVM. Needs root and /dev/kvm;
# installs what is missing and builds the guest images (cached) first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# rustup installs cargo here; a non-login shell may not have it on PATH.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" != 0 ]; then
    echo "test: the end-to-end tests need root (tap devices, bridges, namespaces)" >&2
    exit 1
fi
if [ ! -e /dev/kvm ]; then
    echo "test: the end-to-end tests need /dev/kvm, which this machine does not have" >&2
    exit 1
fi

scripts/install-deps.sh
guest-images/build.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Unit tests and each program's own tests, the API against its OpenAPI
# document (scripts/schemathesis.sh, ~2.5 min), then the end-to-end tests
# (two lanes at once, see scripts/e2e.sh); a failure in one does not hide
# the other.
status=0
cargo test --workspace --exclude nubis-tests --no-fail-fast || status=1
cargo test -p nubis-tests --lib || status=1
scripts/schemathesis.sh || status=1
# Each fuzz target for a bounded time (~4 min with the build): a crash fails.
scripts/fuzz.sh "${NUBIS_FUZZ_SECONDS:-10}" || status=1
scripts/e2e.sh || status=1
exit "$status"
