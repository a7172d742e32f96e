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
#   RESTART_CONTAINERD       true: systemctl restart containerd in PID 1's namespaces
set -eu

cfg=${CONTAINERD_CONFIG:?CONTAINERD_CONFIG is required}
sock=${SNAPSHOTTER_SOCKET:?SNAPSHOTTER_SOCKET is required}
set_default=${SET_DEFAULT_SNAPSHOTTER:-true}
restart=${RESTART_CONTAINERD:-true}

log() { echo "configure-containerd: $*" >&2; }

if [ ! -f "$cfg" ]; then
  log "$cfg missing: creating a version 2 config (containerd 2.x migrates it)"
  printf 'version = 2\n' > "$cfg"
fi
[ -f "$cfg.talaria.bak" ] || cp -p "$cfg" "$cfg.talaria.bak"

version=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$cfg" | head -n 1)
case "$version" in
  2) cri='[plugins."io.containerd.grpc.v1.cri".containerd]' ;;
  3) cri='[plugins."io.containerd.cri.v1.images"]' ;;
  *) log "unsupported config version '${version:-1}' in $cfg: migrate it to version 2 or 3"; exit 1 ;;
esac

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

# Set the CRI snapshotter inside its table (replacing, and keeping as comments, the old
# values), or add the table in the managed block when the file has none.
awk -v target="$cri" -v setdef="$set_default" -v sock="$sock" -v own="$own_plugin" '
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
    if (own != "true" && (setdef != "true" || found)) exit
    print "# >>> talaria (added by the talaria chart; edits here are overwritten)"
    if (own == "true") {
      print "[proxy_plugins.talaria]"
      print "  type = \"snapshot\""
      print "  address = \"" sock "\""
    }
    if (setdef == "true" && !found) { print target; managed() }
    print "# <<< talaria"
  }
' "$tmp" > "$tmp.2"
rm -f "$tmp"

if cmp -s "$tmp.2" "$cfg"; then
  rm -f "$tmp.2"
  log "$cfg already registers talaria; nothing to do"
  exit 0
fi
# Same directory: the rename is atomic, containerd never reads half a file.
mv "$tmp.2" "$cfg"
log "updated $cfg (original kept as $cfg.talaria.bak)"

if [ "$restart" = "true" ]; then
  log "restarting containerd"
  nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd
fi
