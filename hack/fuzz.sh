#!/usr/bin/env bash
# Fuzzes every target of fuzz/fuzz_targets/ for a bounded time, on the stable toolchain.
# Usage: hack/fuzz.sh [seconds_per_target [target...]]   (default: 30 s, every target)
#
# No nightly and no cargo-fuzz: libfuzzer-sys builds libFuzzer with the C++ compiler, and the
# coverage instrumentation libFuzzer steers by comes from stable rustc flags (the ones
# `cargo fuzz build --sanitizer none` passes). `--target <host>` keeps those flags off build
# scripts and proc macros. Builds go to ${TALARIA_FUZZ_TARGET_DIR:-~/.cache/talaria/fuzz-target}
# (reused between runs; cleaned when over 8 GiB), as do the corpora each run grows; the
# committed seeds (fuzz/seeds/<target>/, written by fuzz/src/make_seeds.rs) are only read.
# Exits non-zero when a target finds a crash, a timeout or an out-of-memory input, after
# printing the input's path and how to reproduce it. Needs what hack/setup.sh installs (the
# node's build needs libfuse3-dev, pkg-config and protoc) and a C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: hack/fuzz.sh [seconds_per_target [target...]]" >&2; exit 2; }
dir=${TALARIA_FUZZ_TARGET_DIR:-$HOME/.cache/talaria/fuzz-target}
max_gib=8
host=$(rustc -vV | sed -n 's/^host: //p')

# Bounded: a target dir (builds and grown corpora) over 8 GiB is cleaned; the next build is cold.
# Only a directory cargo made (it writes CACHEDIR.TAG) is removed.
if [ -f "$dir/CACHEDIR.TAG" ]; then
  kib=$(du -sk "$dir" 2>/dev/null | cut -f1) || true
  if [ "${kib:-0}" -gt $((max_gib << 20)) ]; then
    echo "[fuzz] $dir is $((kib >> 20)) GiB, over $max_gib GiB: cleaning it" >&2
    rm -rf "$dir"
  fi
fi
mkdir -p "$dir"

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate.
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
  echo "[fuzz] apt-get install g++ (libFuzzer is C++)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

targets=("${@:2}")
if [ "${#targets[@]}" -eq 0 ]; then
  for f in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
  done
fi
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "no fuzz target $t (fuzz/fuzz_targets/$t.rs)" >&2; exit 2; }
done

# -Cllvm-args=... options as cargo-fuzz sets them (coverage level 4: edges; 8-bit counters and
# the PC table for libFuzzer's feedback; comparison tracing for its value profile; stack depth
# as a feature; no branch folding so that each branch keeps its counter). --cfg fuzzing, debug
# assertions with overflow checks, and one codegen unit (the coverage pass otherwise stops
# inlining across units, a ~3x slower target), as `cargo fuzz build` does.
flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cdebug-assertions
  -Coverflow-checks
  -Ccodegen-units=1
)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "== building ${#targets[@]} fuzz targets (stable, $host) in $dir" >&2
t0=$(date +%s)
# Not --locked: fuzz/ is its own workspace, and a dependency added to the node or the
# artifact crate must not stop the fuzzing; a lock file that changes is reported instead.
lock_before=$(cksum <fuzz/Cargo.lock)
CARGO_TARGET_DIR="$dir" RUSTFLAGS="${flags[*]} ${RUSTFLAGS:-}" \
  cargo build --manifest-path fuzz/Cargo.toml --release --target "$host" "${bins[@]}"
[ "$(cksum <fuzz/Cargo.lock)" = "$lock_before" ] ||
  echo "[fuzz] fuzz/Cargo.lock was out of date with the crates' dependencies and was updated: commit it" >&2
echo "== built in $(( $(date +%s) - t0 ))s; fuzzing each target for ${secs}s" >&2

failed=()
summary=()
for t in "${targets[@]}"; do
  bin="$dir/$host/release/$t"
  corpus="$dir/corpus/$t"
  found="$dir/artifacts/$t"
  log="$dir/logs/$t.log"
  mkdir -p "$corpus" "$found" "$dir/logs"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  # A corpus past 4,000 inputs is minimized first (libFuzzer's merge keeps one input per
  # feature), so that loading it stays a small part of the run.
  if [ "$(find "$corpus" -type f | wc -l)" -gt 4000 ]; then
    rm -rf "$corpus.min" && mkdir -p "$corpus.min"
    if "$bin" -merge=1 -timeout=10 -rss_limit_mb=2048 "$corpus.min" "$corpus" >"$log" 2>&1; then
      rm -rf "$corpus" && mv "$corpus.min" "$corpus"
    else
      rm -rf "$corpus.min"
    fi
  fi
  # Inputs that failed in an earlier run fail this one too until fixed; fixed ones go.
  stale=()
  for f in "$found"/*; do
    [ -f "$f" ] || continue
    if "$bin" -runs=1 -timeout=10 -rss_limit_mb=2048 "$f" >"$log.old" 2>&1; then
      echo "[fuzz] $t: $f no longer fails; removed" >&2
      rm -f "$f"
    else
      stale+=("$f")
    fi
  done
  before=$(find "$found" -type f | sort)
  start=$(date +%s)
  rc=0
  # New inputs go to the first corpus directory; the seeds are read only. A single input
  # running over 10 s is a finding (timeout-*), and so is one over 2 GiB of memory (oom-*).
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$found/" "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?
  took=$(( $(date +%s) - start ))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  units=$(find "$corpus" -type f | wc -l)
  new=$(comm -13 <(echo "$before") <(find "$found" -type f | sort) | sed '/^$/d')
  if [ "$rc" -ne 0 ] || [ -n "$new" ] || [ "${#stale[@]}" -gt 0 ]; then
    result="FAILED (exit $rc)"
    [ "$rc" -eq 0 ] && [ -z "$new" ] && result="FAILED (an earlier crash input)"
    failed+=("$t")
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
      echo "== $t: FAILED (exit $rc); full log: $log" >&2
      grep -A3 -m1 'panicked at' "$log" >&2 || true
      grep -E 'ERROR: libFuzzer|^SUMMARY|Test unit written|^Base64' "$log" >&2 || true
    fi
    for f in $new; do
      echo "== $t: crash input: $f" >&2
      echo "   reproduce: $bin $f" >&2
    done
    for f in "${stale[@]}"; do
      echo "== $t: an earlier crash input still fails: $f" >&2
      echo "   reproduce: $bin $f" >&2
    done
  else
    result=ok
  fi
  line=$(printf '%-18s %10s runs %4ss  corpus %5s  %s' "$t" "${runs:-?}" "$took" "$units" "$result")
  summary+=("$line")
  echo "$line" >&2
done

echo "== fuzz summary (${secs}s per target)" >&2
printf '%s\n' "${summary[@]}" >&2
if [ "${#failed[@]}" -gt 0 ]; then
  echo "== fuzzing found problems in: ${failed[*]} (inputs under $dir/artifacts/)" >&2
  exit 1
fi
echo "== fuzzing: ${#targets[@]} targets, no crash" >&2
