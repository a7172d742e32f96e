#!/bin/sh
# Registers talaria-node with the node's containerd as a proxy snapshotter, optionally makes it
# the CRI's default snapshotter, and restarts containerd when the config changed.
# Idempotent: earlier edits of this script are undone first, so a rerun with the same settings
# changes nothing and restarts nothing. The first original is kept as <config>.talaria.bak.
#
# Environment:
#   CONTAINERD_CONFIG        containerd's config.toml (created with version = 2 if missing)
#   SNAPSHOTTER_SOCKET       talaria-node's socket
#   SET_DEFAULT_SNAPSHOTTER  true: CRI uses snapshotter "talaria" (and passes image annotations)
#   RESTART_CONTAINERD       true: restart containerd after a change, by RESTART_METHOD:
#   RESTART_METHOD           systemd (default): `systemctl restart containerd` in PID 1's
#                            namespaces (needs hostPID);
#                            signal: SIGTERM to the containerd running with HOST_CONTAINERD_CONFIG
#                            (found in the host's /proc, needs hostPID), for hosts whose
#                            supervisor restarts it (runit, s6, supervisord, a test harness);
#                            then waits until a new containerd with that config runs
#   HOST_CONTAINERD_CONFIG   CONTAINERD_CONFIG's path on the host (signal method)
set -eu

cfg=${CONTAINERD_CONFIG:?CONTAINERD_CONFIG is required}
sock=${SNAPSHOTTER_SOCKET:?SNAPSHOTTER_SOCKET is required}
set_default=${SET_DEFAULT_SNAPSHOTTER:-true}
restart=${RESTART_CONTAINERD:-true}
method=${RESTART_METHOD:-systemd}
host_cfg=${HOST_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
case "$method" in
  systemd | signal) ;;
  *) echo "configure-containerd: RESTART_METHOD must be systemd or signal, not '$method'" >&2; exit 1 ;;
esac

log() { echo "configure-containerd: $*" >&2; }

# PIDs of the host's containerd daemons started with $host_cfg (no --config: the default
# path). Shims are other commands, so they never match.
containerd_pids() {
  for d in /proc/[0-9]*; do
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    case "$comm" in containerd | containerd2) ;; *) continue ;; esac
    args=" $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) " || continue
    case "$args" in
      *" --config $host_cfg "* | *" -c $host_cfg "* | *" --config=$host_cfg "*) echo "${d#/proc/}" ;;
      *" --config "* | *" -c "* | *" --config="*) ;;
      *) [ "$host_cfg" != /etc/containerd/config.toml ] || echo "${d#/proc/}" ;;
    esac
  done
}

# wait_until SECONDS COMMAND...: polls COMMAND every half second.
wait_until() {
  limit=$(( $1 * 2 )); shift
  i=0
  while ! "$@"; do
    i=$((i + 1))
    [ "$i" -lt "$limit" ] || return 1
    sleep 0.5
  done
}
gone() { for p in $old; do [ ! -d "/proc/$p" ] || return 1; done; }
back() { [ -n "$(containerd_pids)" ]; }

if [ ! -f "$cfg" ]; then
  log "$cfg missing: creating a version 2 config (containerd 2.x migrates it)"
  printf 'version = 2\n' > "$cfg"
fi
[ -f "$cfg.talaria.bak" ] || cp -p "$cfg" "$cfg.talaria.bak"

version=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$cfg" | head -n 1)
case "$version" in
  2) cri='[plugins."io.containerd.grpc.v1.cri".containerd]'
     runtimes='plugins."io.containerd.grpc.v1.cri".containerd.runtimes' ;;
  3 | 4) cri='[plugins."io.containerd.cri.v1.images"]'
     runtimes='plugins."io.containerd.cri.v1.runtime".containerd.runtimes' ;;
  *) log "unsupported config version '${version:-1}' in $cfg: migrate it to version 2, 3 or 4"; exit 1 ;;
esac

# containerd's version, from the running daemon's binary (in its own mount namespace).
containerd_minor() {
  pid=$(containerd_pids | head -n 1)
  [ -n "$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe") || return 1
  nsenter -t "$pid" -m -- "$exe" --version 2>/dev/null |
    sed -n 's/.* v\{0,1\}\([0-9][0-9]*\)\.\([0-9][0-9]*\)\..*/\1 \2/p' | head -n 1
}

# The agent's own pods run on runtime handler talaria-bootstrap (RuntimeClass of the chart),
# whose snapshotter is overlayfs: talaria-node never needs talaria-node to start. containerd
# has per-runtime snapshotters from 1.7 on; on 1.6 the handler would still use the default
# snapshotter, so talaria is not made the default there (the agent could not restart).
if [ "$set_default" = true ] && [ "$version" = 2 ]; then
  if mm=$(containerd_minor) && [ -n "$mm" ]; then
    set -- $mm
    if [ "$1" -lt 1 ] || { [ "$1" = 1 ] && [ "$2" -lt 7 ]; }; then
      log "containerd $1.$2 has no per-runtime snapshotter: talaria is registered but not made the default snapshotter (talaria-node's own pod would need talaria-node to start); upgrade to containerd 1.7+ (see README)"
      set_default=false
    fi
  else
    log "could not read containerd's version (hostPID needed); assuming 1.7+"
  fi
fi

tmp="$cfg.talaria.tmp"
# Undo earlier runs: drop the managed block and managed lines, restore replaced lines.
awk '
  /^# >>> talaria/ { skip = 1; next }
  /^# <<< talaria/ { skip = 0; next }
  skip { next }
  /# talaria-managed$/ { next }
  /^# talaria-replaced: / { sub(/^# talaria-replaced: /, ""); print; next }
  { print }
' "$cfg" > "$tmp"

if grep -q '^[[:space:]]*\[proxy_plugins\.talaria\]' "$tmp"; then
  log "[proxy_plugins.talaria] is configured by hand; leaving it alone"
  own_plugin=false
else
  own_plugin=true
fi

# A bootstrap handler written by hand (e.g. from config/containerd/) stays as it is: a second
# table of the same name would make containerd refuse its config.
if grep -q "^[[:space:]]*\[$(printf '%s' "$runtimes" | sed 's/[].[]/\\&/g')\.talaria-bootstrap\]" "$tmp"; then
  log "runtime talaria-bootstrap is configured by hand; leaving it alone"
  own_runtime=false
else
  own_runtime=true
fi

# The runc runtime's options table body (cgroup driver...), for the bootstrap runtime.
awk -v t="[$runtimes.runc.options]" '
  /^[[:space:]]*\[/ { h = $0; sub(/#.*/, "", h); gsub(/[[:space:]]/, "", h); gsub(/\047/, "\"", h); in_t = (h == t); next }
  in_t && NF { print }
' "$tmp" > "$tmp.runc"

# Set the CRI snapshotter inside its table (replacing, and keeping as comments, the old
# values), or add the table in the managed block when the file has none.
awk -v target="$cri" -v setdef="$set_default" -v sock="$sock" -v own="$own_plugin" \
    -v runtimes="$runtimes" -v runc_opts="$tmp.runc" -v own_rt="$own_runtime" '
  function managed() {
    print "  snapshotter = \"talaria\" # talaria-managed"
    print "  disable_snapshot_annotations = false # talaria-managed"
  }
  /^[[:space:]]*\[/ {
    h = $0; sub(/#.*/, "", h); gsub(/[[:space:]]/, "", h); gsub(/\047/, "\"", h)
    in_t = (h == target)
    print
    if (in_t && setdef == "true") { managed(); found = 1 }
    next
  }
  in_t && setdef == "true" && /^[[:space:]]*(snapshotter|disable_snapshot_annotations)[[:space:]]*=/ {
    print "# talaria-replaced: " $0; next
  }
  { print }
  END {
    print "# >>> talaria (added by the talaria chart; edits here are overwritten)"
    if (own == "true") {
      print "[proxy_plugins.talaria]"
      print "  type = \"snapshot\""
      print "  address = \"" sock "\""
    }
    if (setdef == "true" && !found) { print target; managed() }
    # The agent runs here, on overlayfs, whatever the default snapshotter is.
    if (own_rt == "true") {
      print "[" runtimes ".talaria-bootstrap]"
      print "  runtime_type = \"io.containerd.runc.v2\""
      print "  snapshotter = \"overlayfs\""
      print "[" runtimes ".talaria-bootstrap.options]"
      while ((getline line < runc_opts) > 0) print line
    }
    print "# <<< talaria"
  }
' "$tmp" > "$tmp.2"
rm -f "$tmp" "$tmp.runc"

if cmp -s "$tmp.2" "$cfg"; then
  rm -f "$tmp.2"
  log "$cfg already registers talaria; nothing to do"
  exit 0
fi
# Same directory: the rename is atomic, containerd never reads half a file.
mv "$tmp.2" "$cfg"
log "updated $cfg (original kept as $cfg.talaria.bak)"


if [ "$restart" = "true" ]; then
  case "$method" in
    systemd)
      log "restarting containerd (systemd)"
      nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd
      ;;
    signal)
      old=$(containerd_pids)
      if [ -z "$old" ]; then
        log "no containerd runs with config $host_cfg (hostPID needed): restart it by hand"
        exit 1
      fi
      log "restarting containerd: SIGTERM to $old; its supervisor starts it again"
      # shellcheck disable=SC2086
      kill -TERM $old
      wait_until 60 gone || { log "containerd ($old) still runs 60 s after SIGTERM"; exit 1; }
      wait_until 120 back || { log "no new containerd with $host_cfg within 120 s: its supervisor did not restart it"; exit 1; }
      log "containerd is back (pid $(containerd_pids | tr '\n' ' '))"
      ;;
  esac
fi
