#!/usr/bin/env bash
# The one test command: install what is missing, check formatting and lints, run every test.
# Integration tests start real components (registry, etcd + kube-apiserver, containerd + runc
# + FUSE); a component that cannot start fails the test, never skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash hack/setup.sh
. hack/env.sh
# Integration tests never skip: a component that cannot start fails its test.
# Builds go to a cache dir shared by every checkout on this machine (CI clones afresh), so a
# warm run recompiles only the workspace's own crates.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/talaria/target}

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
echo "== hack/test.sh done in $(( $(date +%s) - t0 ))s" >&2
