#!/usr/bin/env bash
# Builds the startup ground-truth images from Debian packages, once, into a cache dir keyed by
# this script's content; a warm run only checks and prints the dir.
#
#   hack/debian-images.sh            # prints the image dir on stdout, progress on stderr
#
# Layout of the printed dir:
#   base.tar.gz                      debootstrap --variant=minbase bookworm (layer 0 of every image)
#   <image>/layer.tar.gz             the packages and app files installed on top (layer 1; OCI
#                                    whiteouts for what the install removed)
#   <image>/config.json              OCI image config (Entrypoint, Cmd, Env, WorkingDir)
#   <image>/ready                    how the harness knows the startup is done: `exit` (the
#                                    process exits 0) or `listen` (a socket is listening)
# Needs root (debootstrap, chroot, overlayfs), debootstrap, getfattr (attr), jq, javac/jar 17.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${TALARIA_CACHE:-$HOME/.cache/talaria}/images
KEY=$(cat "$0" | sha256sum | cut -c1-12)
OUT=$CACHE/debian-$SUITE-$KEY
DEBS=$CACHE/debian-debs
IMAGES=(python java node nginx shell)

log() { echo "[debian-images] $*" >&2; }

if [ -f "$OUT/done" ]; then
  echo "$OUT"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot, overlayfs)"; exit 2; }
for t in debootstrap getfattr jq javac jar unshare flock pigz; do
  command -v "$t" >/dev/null || { log "$t is required (hack/setup.sh installs it)"; exit 2; }
done

mkdir -p "$CACHE" "$DEBS"
# One builder at a time (tests may call this concurrently); the second one finds `done`.
exec 9>"$CACHE/.debian-images.lock"
flock 9
if [ -f "$OUT/done" ]; then
  echo "$OUT"
  exit 0
fi
# Older keys are rebuilt from scratch; drop them (disk is tight).
for old in "$CACHE"/debian-"$SUITE"-*; do
  [ "$old" = "$OUT" ] || rm -rf "$old"
done
t0=$(date +%s)
WORK=$OUT.work
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK" "$OUT"
trap 'rm -rf "$WORK"' EXIT

# tar_layer DIR OUT: a gzip layer of DIR with real mtimes (Python trusts a .pyc only when its
# recorded source mtime matches) and numeric owners; device nodes and mount points' contents
# are left out, as in published images.
tar_layer() {
  tar --sort=name --numeric-owner --format=pax \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -C "$1" -cf - . | pigz -n -6 > "$2.tmp"
  mv "$2.tmp" "$2"
}

log "debootstrap --variant=minbase $SUITE (debs cached in $DEBS)"
BASE=$WORK/base
debootstrap --variant=minbase --cache-dir="$DEBS" "$SUITE" "$BASE" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
# A container gets these from the runtime, not from the image.
rm -f "$BASE/etc/hostname"
: > "$BASE/etc/resolv.conf"
rm -rf "$BASE"/var/lib/apt/lists/* "$BASE"/var/cache/apt/archives/*.deb
tar_layer "$BASE" "$OUT/base.tar.gz"

# The small jar of the JVM image, built with the host's JDK 17.
JAR=$WORK/jar
mkdir -p "$JAR/src"
cat > "$JAR/src/Main.java" <<'EOF'
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.stream.Collectors;

public class Main {
    public static void main(String[] args) {
        Map<String, Integer> counts = new TreeMap<>();
        for (String w : List.of("talaria", "startup", "talaria", "paths")) {
            counts.merge(w, 1, Integer::sum);
        }
        String out = counts.entrySet().stream()
            .map(e -> e.getKey() + "=" + e.getValue())
            .collect(Collectors.joining(","));
        System.out.println("ready " + out);
    }
}
EOF
javac --release 17 -d "$JAR/classes" "$JAR/src/Main.java"
jar --create --file "$JAR/app.jar" --main-class Main -C "$JAR/classes" .

# app_files IMAGE ROOT: the application part of IMAGE, written into ROOT.
app_files() {
  local r=$2
  case $1 in
    python)
      mkdir -p "$r/app/greet"
      cat > "$r/app/main.py" <<'EOF'
import datetime
import hashlib
import json
import os
import pathlib
import re

from greet import hello

doc = {"cwd": os.getcwd(), "digest": hashlib.sha256(b"talaria").hexdigest()[:12],
       "today": datetime.date.today().isoformat(), "words": re.findall(r"\w+", hello()),
       "app": pathlib.Path(__file__).name}
print(json.dumps(doc, sort_keys=True))
EOF
      printf 'def hello():\n    return "hello from greet"\n' > "$r/app/greet/__init__.py"
      ;;
    java)
      mkdir -p "$r/app"
      cp "$JAR/app.jar" "$r/app/app.jar"
      ;;
    node)
      mkdir -p "$r/app/lib"
      cat > "$r/app/main.js" <<'EOF'
const os = require('os');
const path = require('path');
const { greet } = require('./lib/greet');
console.log(JSON.stringify({ msg: greet('talaria'), base: path.basename(__filename), cpus: os.cpus().length > 0 }));
EOF
      echo "exports.greet = (n) => 'hello ' + n;" > "$r/app/lib/greet.js"
      echo '{"name": "app", "version": "1.0.0", "main": "main.js"}' > "$r/app/package.json"
      ;;
    nginx)
      # A container's log goes to stdout (as the official image links it); the harness sees
      # a real log file opened anyway.
      ;;
    shell)
      mkdir -p "$r/usr/local/bin"
      cat > "$r/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
: "${APP_MODE:=production}"
export APP_MODE
if [ "${1#-}" != "$1" ]; then
	set -- curl "$@"
fi
exec "$@"
EOF
      chmod 755 "$r/usr/local/bin/docker-entrypoint.sh"
      ;;
  esac
}

packages() {
  case $1 in
    python) echo python3 ;;
    java) echo openjdk-17-jre-headless ;;
    node) echo nodejs ;;
    nginx) echo nginx ;;
    shell) echo curl ;;
  esac
}

# config IMAGE: the image config's `config` object.
config() {
  local path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  case $1 in
    python) jq -cn --arg p "$path" '{Env: ["PATH=\($p)", "LANG=C.UTF-8"], Cmd: ["python3", "/app/main.py"], WorkingDir: "/app"}' ;;
    java) jq -cn --arg p "$path" '{Env: ["PATH=\($p)", "JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64"], Entrypoint: ["java", "-jar", "/app/app.jar"], WorkingDir: "/app"}' ;;
    node) jq -cn --arg p "$path" '{Env: ["PATH=\($p)", "NODE_ENV=production"], Cmd: ["node", "main.js"], WorkingDir: "/app"}' ;;
    nginx) jq -cn --arg p "$path" '{Env: ["PATH=\($p)"], Cmd: ["nginx", "-g", "daemon off;"]}' ;;
    shell) jq -cn --arg p "$path" '{Env: ["PATH=\($p)"], Entrypoint: ["docker-entrypoint.sh"], Cmd: ["curl", "--version"]}' ;;
  esac
}

ready() { case $1 in nginx) echo listen ;; *) echo exit ;; esac; }

# overlay_to_oci UPPER: turns overlayfs whiteouts (0/0 char devices) and opaque directories
# (trusted.overlay.opaque=y) into the OCI layer forms `.wh.<name>` and `.wh..wh..opq`.
overlay_to_oci() {
  local up=$1 f
  while IFS= read -r -d '' f; do
    if [ "$(stat -c '%t:%T' "$f")" = "0:0" ]; then
      rm -f "$f"
      : > "$(dirname "$f")/.wh.$(basename "$f")"
    fi
  done < <(find "$up" -type c -print0)
  while IFS= read -r -d '' f; do
    if [ "$(getfattr --absolute-names --only-values -n trusted.overlay.opaque "$f" 2>/dev/null)" = y ]; then
      setfattr -x trusted.overlay.opaque "$f"
      : > "$f/.wh..wh..opq"
    fi
  done < <(find "$up" -type d -print0)
}

for img in "${IMAGES[@]}"; do
  s=$(date +%s)
  log "$img: apt-get install $(packages "$img")"
  d=$WORK/$img
  mkdir -p "$d/upper" "$d/work" "$d/merged"
  # A private mount namespace: every mount goes away with it, whatever happens.
  unshare --mount --fork bash -euo pipefail -c '
    base=$1 d=$2 debs=$3 pkgs=$4
    mount --make-rprivate /
    mount -t overlay overlay -o "lowerdir=$base,upperdir=$d/upper,workdir=$d/work" "$d/merged"
    mount -t proc proc "$d/merged/proc"
    mount --rbind /dev "$d/merged/dev"
    mount --bind "$debs" "$d/merged/var/cache/apt/archives"
    cp /etc/resolv.conf "$d/resolv.conf"
    mount --bind "$d/resolv.conf" "$d/merged/etc/resolv.conf"
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C
    # Maintainer scripts must not start services (nginx would listen on the host).
    printf "#!/bin/sh\nexit 101\n" > "$d/merged/usr/sbin/policy-rc.d"
    chmod 755 "$d/merged/usr/sbin/policy-rc.d"
    chroot "$d/merged" apt-get update -qq
    chroot "$d/merged" apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    rm -rf "$d/merged"/var/lib/apt/lists/* "$d/merged"/var/cache/apt/*.bin "$d/merged/usr/sbin/policy-rc.d"
  ' _ "$BASE" "$d" "$DEBS" "$(packages "$img")" >"$d.log" 2>&1 || { tail -30 "$d.log" >&2; exit 1; }
  app_files "$img" "$d/upper"
  overlay_to_oci "$d/upper"
  rm -rf "$d/upper/tmp" "$d/upper/var/cache/apt/archives"
  mkdir -p "$OUT/$img"
  tar_layer "$d/upper" "$OUT/$img/layer.tar.gz"
  jq -n --argjson c "$(config "$img")" '{architecture: "amd64", os: "linux", config: $c}' > "$OUT/$img/config.json"
  ready "$img" > "$OUT/$img/ready"
  rm -rf "$d"
  log "$img: $(du -h "$OUT/$img/layer.tar.gz" | cut -f1) layer in $(( $(date +%s) - s ))s"
done

rm -rf "$WORK"
echo "$(( $(date +%s) - t0 ))" > "$OUT/build-seconds"
touch "$OUT/done"
log "built in $(( $(date +%s) - t0 ))s: $OUT"
echo "$OUT"
