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

# That shared dir grows without bound (old artifacts of every toolchain, lockfile and edit
# stay; one reached 68 GB and filled a disk). Before building, if it is over
# TALARIA_TARGET_MAX_GB GiB (default 20): drop its incremental dirs (only an edit loop's
# cache), and if it is still over, clean it entirely: the next build starts cold.
bound_target_dir() {
  local dir=$CARGO_TARGET_DIR max=${TALARIA_TARGET_MAX_GB:-20} kib
  [[ "$max" =~ ^[0-9]+$ ]] || { echo "TALARIA_TARGET_MAX_GB must be a whole number of GiB, not '$max'" >&2; exit 2; }
  [ -d "$dir" ] || return 0
  # Only a directory cargo made (it writes CACHEDIR.TAG there) is cleaned.
  [ -f "$dir/CACHEDIR.TAG" ] || { echo "[test] $dir has no CACHEDIR.TAG: not a cargo target dir, not bounding it" >&2; return 0; }
  kib=$(du -sk "$dir" 2>/dev/null | cut -f1) || true
  [ "${kib:-0}" -gt $((max << 20)) ] || return 0
  echo "[test] $dir is $((kib >> 20)) GiB, over $max GiB (TALARIA_TARGET_MAX_GB): removing its incremental dirs" >&2
  find "$dir" -mindepth 2 -maxdepth 3 -type d -name incremental -prune -exec rm -rf {} + || true
  kib=$(du -sk "$dir" 2>/dev/null | cut -f1) || true
  [ "${kib:-0}" -gt $((max << 20)) ] || { echo "[test] $dir is now $((kib >> 20)) GiB" >&2; return 0; }
  echo "[test] $dir is still $((kib >> 20)) GiB: cleaning it entirely (cargo clean); this build starts cold" >&2
  cargo clean --quiet
}
bound_target_dir
# No incremental compilation for this run: it only speeds up rebuilding the workspace's own
# crates after small edits (dependencies are never incremental), while its caches are a large
# part of a target dir's size (per crate, per profile, per check/clippy/test build) and its
# codegen is no faster for a one-shot build of the whole workspace. Set CARGO_INCREMENTAL=1
# to keep it. (Alternating with an incremental `cargo test` rebuilds the workspace's crates.)
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

echo "== layers (hack/check-layers.py)" >&2
python3 hack/check-layers.py
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
echo "== fuzzing (hack/fuzz.sh, 30 s per target)" >&2
bash hack/fuzz.sh 30
echo "== hack/test.sh done in $(( $(date +%s) - t0 ))s" >&2
