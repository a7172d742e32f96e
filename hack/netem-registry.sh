#!/usr/bin/env bash
# A registry behind a slow link, standing in for a cloud registry in benchmarks.
#
#   hack/netem-registry.sh start NAME RATE_MBIT DELAY_MS   # prints HOST:PORT (plain HTTP)
#   hack/netem-registry.sh stop NAME
#   hack/netem-registry.sh status NAME
#
# The registry runs in its own network namespace (talaria-NAME), joined to this one by a veth
# pair with addresses 10.213.N.1/30 (host) and 10.213.N.2/30 (namespace), our private test
# range; the namespace has no default route, so only this machine reaches it. `tbf` limits
# both directions to RATE_MBIT. This kernel has no netem, so the round-trip DELAY_MS is added
# by talaria-delay-relay (e2e/src/relay.rs) in front of the registry inside the namespace:
# one round trip per new connection (the handshake) and half a round trip per direction on
# every chunk. The same setup from Rust: talaria_testenv::registry::Registry::start_shaped.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/env.sh

usage() { echo "usage: $0 start NAME RATE_MBIT DELAY_MS | stop NAME | status NAME" >&2; exit 2; }
die() { echo "[netem-registry] $*" >&2; exit 1; }

[ $# -ge 2 ] || usage
cmd=$1 name=$2
[[ $name =~ ^[a-zA-Z0-9_-]{1,40}$ ]] || die "NAME must be 1-40 of [a-zA-Z0-9_-]"
ns=talaria-$name
state=${TALARIA_NETEM_STATE:-/tmp/talaria-netem}/$name

stop() {
  if ip netns list | grep -qw "$ns"; then
    # Everything we started lives in the namespace.
    pids=$(ip netns pids "$ns" || true)
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    for _ in $(seq 50); do
      [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] || break
      sleep 0.1
    done
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns"
  fi
  if [ -f "$state/index" ]; then
    ip link del "tlr$(cat "$state/index")h" 2>/dev/null || true
  fi
  rm -rf "$state"
}

case $cmd in
start)
  [ $# -eq 4 ] || usage
  rate=$3 delay=$4
  [[ $rate =~ ^[0-9]+$ && $rate -ge 1 ]] || die "RATE_MBIT must be a positive integer"
  [[ $delay =~ ^[0-9]+$ ]] || die "DELAY_MS must be a non-negative integer"
  [ ! -e "$state" ] || die "$name is already running (stop it first): $state"
  registry=$(command -v docker-registry) || die "docker-registry not found: run hack/setup.sh"
  cargo build -q -p talaria-testenv --bin talaria-delay-relay
  relay=${CARGO_TARGET_DIR:-$PWD/target}/debug/talaria-delay-relay
  [ -x "$relay" ] || die "relay binary missing at $relay"

  # The host-side veth name is the lock on slot N (shared with the Rust side).
  n=""
  for i in $(seq 1 250); do
    if ip link add "tlr${i}h" type veth peer name "tlr${i}n" 2>/dev/null; then n=$i; break; fi
  done
  [ -n "$n" ] || die "no free 10.213.N.0/30 slot"
  mkdir -p "$state/storage"
  echo "$n" > "$state/index"
  trap 'stop' ERR
  ip netns add "$ns"
  ip link set "tlr${n}n" netns "$ns"
  ip addr add "10.213.$n.1/30" dev "tlr${n}h"
  ip link set "tlr${n}h" up
  ip -n "$ns" addr add "10.213.$n.2/30" dev "tlr${n}n"
  ip -n "$ns" link set "tlr${n}n" up
  ip -n "$ns" link set lo up
  burst=$(( rate * 1000000 / 8 / 100 )); [ "$burst" -ge 65536 ] || burst=65536
  tc qdisc add dev "tlr${n}h" root tbf rate "${rate}mbit" burst "$burst" latency 200ms
  tc -n "$ns" qdisc add dev "tlr${n}n" root tbf rate "${rate}mbit" burst "$burst" latency 200ms

  cat > "$state/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $state/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:5001
  secret: talaria-netem-$name
EOF
  ip netns exec "$ns" setsid "$registry" serve "$state/config.yml" \
    > "$state/registry.log" 2>&1 < /dev/null &
  ip netns exec "$ns" setsid "$relay" "10.213.$n.2:5000" 127.0.0.1:5001 "$delay" \
    > "$state/relay.log" 2>&1 < /dev/null &
  host="10.213.$n.2:5000"
  echo "$host" > "$state/host"
  for _ in $(seq 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$host/v2/" || true)
    [ "$code" = 200 ] && { trap - ERR; echo "$host"; exit 0; }
    sleep 0.1
  done
  tail -20 "$state/registry.log" "$state/relay.log" >&2 || true
  stop
  die "registry did not answer on http://$host/v2/"
  ;;
stop)
  stop
  ;;
status)
  [ -f "$state/host" ] || die "$name is not running"
  host=$(cat "$state/host")
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://$host/v2/" || true)
  echo "$host /v2/ -> $code"
  [ "$code" = 200 ]
  ;;
*) usage ;;
esac
