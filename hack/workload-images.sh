#!/usr/bin/env bash
# Builds the issue-8 benchmark workloads from Debian bookworm packages (and, for ml, PyPI), once,
# into a cache dir keyed by this script's content; a warm run only prints the dir.
#
#   hack/workload-images.sh [WORKLOAD ...]   # prints the image dir on stdout, progress on stderr
#
# Default: jvm python postgres. ml is built only when named (it is large: 3.4 GiB compressed,
# 5.9 GiB unpacked, from 2.9 GB of wheels); the named ones are added to the same dir, each once.
# Images of several layers each (base + runtime + libs + app), each >= 500 MiB unpacked,
# whose startup reads a small part of them:
#   jvm       OpenJDK 17 + a large set of Debian's Java libraries, of which the service's classpath
#             names the ~27 jars it uses (as a service's lib/ would); a small
#             com.sun.net.httpserver app that loads library classes, then answers 200 on :18080
#   python    python3 + numpy, scipy, pandas, scikit-learn, matplotlib, statsmodels, ...; an
#             http.server that imports them, then answers 200 on :18081
#   postgres  PostgreSQL 15 + PostGIS, pgRouting, PL/Python, ...; a data dir made by initdb at
#             build time; listens on 127.0.0.1:15432, runs as the postgres user
#   ml        python3 + a venv with torch (PyPI's CUDA build, with its nvidia-* wheels) and
#             transformers; a GPT-2-small-shaped model with random weights (~475 MiB of
#             safetensors) made at build time; at start the service imports torch (which loads
#             the CUDA libraries, on CPU too), loads the model, runs one forward pass on CPU,
#             then answers 200 on :18082. Checked at build time: started in a chroot until 200.
#
# Layout of the printed dir:
#   base.tar.gz (+ .diffid)          debootstrap --variant=minbase bookworm (layer 0 of every image)
#   <w>/layers                       the layer files of <w>, one a line, in order (relative to the dir)
#   <w>/<layer>.tar.gz (+ .diffid)   runtime, libs, app: what each step added (OCI whiteouts)
#   <w>/config.json                  OCI image config (Entrypoint/Cmd, Env, WorkingDir, User)
#   <w>/ready                        `http PORT` (GET / answers 200) or `log TEXT` (a log line)
#   <w>/unpacked-bytes               sum of the layers' uncompressed tar sizes
#   <w>/done                         <w> is complete (done: all of the default ones are)
# Needs root (debootstrap, chroot, overlayfs), debootstrap, getfattr (attr), jq, javac/jar 17
# (jvm), pigz, curl (ml's check); ml needs network access to PyPI from the chroot (the host's CA
# bundle, /etc/ssl/certs/ca-certificates.crt or $PIP_CERT, is handed to pip).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${TALARIA_CACHE:-$HOME/.cache/talaria}/images
KEY=$(sha256sum < "$0" | cut -c1-12)
OUT=$CACHE/workloads-$SUITE-$KEY
DEBS=$CACHE/debian-debs
WHEELS=$CACHE/ml-wheels
DEFAULT_WORKLOADS=(jvm python postgres)
ALL_WORKLOADS=(jvm python postgres ml)
# ml: the newest torch whose nvidia-* wheels all resolve for bookworm's Python 3.11 on PyPI here
# (2.7.1, CUDA 12.6); transformers from the same time.
TORCH_VERSION=2.7.1
TRANSFORMERS_VERSION=4.57.6
PATH_ENV=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "[workload-images] $*" >&2; }

WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=("${DEFAULT_WORKLOADS[@]}")
for w in "${WORKLOADS[@]}"; do
  case " ${ALL_WORKLOADS[*]} " in
    *" $w "*) ;;
    *) log "unknown workload $w (known: ${ALL_WORKLOADS[*]})"; exit 2 ;;
  esac
done
# all_done: every requested workload is built.
all_done() {
  local w
  for w in "${WORKLOADS[@]}"; do [ -f "$OUT/$w/done" ] || return 1; done
}

if all_done; then
  echo "$OUT"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot, overlayfs)"; exit 2; }
need=(debootstrap getfattr setfattr jq unshare flock pigz)
case " ${WORKLOADS[*]} " in *" jvm "*) need+=(javac jar) ;; esac
case " ${WORKLOADS[*]} " in *" ml "*) need+=(curl) ;; esac
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || { log "$t is required (hack/setup.sh installs it)"; exit 2; }
done

mkdir -p "$CACHE" "$DEBS" "$WHEELS"
exec 9>"$CACHE/.workload-images.lock"
flock 9
if all_done; then
  echo "$OUT"
  exit 0
fi
# Older keys are rebuilt from scratch; drop them (disk is tight).
for old in "$CACHE"/workloads-"$SUITE"-*; do
  [ "$old" = "$OUT" ] || [ "$old" = "$OUT.work" ] || rm -rf "$old"
done
t0=$(date +%s)
WORK=$OUT.work
rm -rf "$WORK"
mkdir -p "$WORK/lists" "$OUT"
trap 'rm -rf "$WORK"' EXIT

# tar_layer DIR OUT: a gzip layer of DIR with real mtimes and numeric owners (as
# hack/debian-images.sh makes them), and OUT.diffid = the digest of the uncompressed tar.
tar_layer() {
  tar --sort=name --numeric-owner --format=pax \
      --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
      --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -C "$1" -cf - . | tee >(sha256sum | cut -d' ' -f1 > "$2.sha") >(wc -c > "$2.size") \
      | pigz -n -6 > "$2.tmp"
  # The process substitutions finish after tar; wait for their files (bounded: 60 s).
  local i=0
  while [ ! -s "$2.sha" ] || [ ! -s "$2.size" ]; do
    i=$((i + 1))
    [ "$i" -le 600 ] || { log "no digest or size for $2"; exit 1; }
    sleep 0.1
  done
  echo "sha256:$(cat "$2.sha")" > "$2.diffid"
  rm -f "$2.sha"
  mv "$2.tmp" "$2"
}

# overlay_to_oci UPPER: overlayfs whiteouts (0/0 char devices) and opaque directories
# (trusted.overlay.opaque=y) become the OCI forms `.wh.<name>` and `.wh..wh..opq`.
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

BASE=$WORK/base
if [ -f "$OUT/base.done" ]; then
  # Built by an earlier run (for other workloads): its tree again, as the lower of the steps.
  log "base: from $OUT/base.tar.gz"
  mkdir -p "$BASE"
  tar --numeric-owner -xzf "$OUT/base.tar.gz" -C "$BASE"
  mkdir -p "$BASE/dev" "$BASE/proc" "$BASE/sys"
else
  log "debootstrap --variant=minbase $SUITE (debs cached in $DEBS)"
  debootstrap --variant=minbase --cache-dir="$DEBS" "$SUITE" "$BASE" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # A container gets these from the runtime, not from the image.
  rm -f "$BASE/etc/hostname"
  : > "$BASE/etc/resolv.conf"
  rm -rf "$BASE"/var/lib/apt/lists/* "$BASE"/var/cache/apt/archives/*.deb
  tar_layer "$BASE" "$OUT/base.tar.gz"
  touch "$OUT/base.done"
fi

# step W NAME LOWERS SCRIPT: runs SCRIPT (bash, in a private mount namespace) with the merged
# root of LOWERS (colon-separated, top first) plus a fresh upper dir at $root; the upper dir
# is kept as $WORK/W/NAME. Apt lists and downloaded debs live outside the root.
step() {
  local w=$1 name=$2 lowers=$3 script=$4 d=$WORK/$1
  mkdir -p "$d/$name" "$d/$name.work" "$d/merged"
  unshare --mount --fork bash -euo pipefail -c '
    lowers=$1 upper=$2 work=$3 root=$4 debs=$5 lists=$6 script=$7
    mount --make-rprivate /
    mount -t overlay overlay -o "lowerdir=$lowers,upperdir=$upper,workdir=$work" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --bind "$debs" "$root/var/cache/apt/archives"
    mount --bind "$lists" "$root/var/lib/apt/lists"
    cp /etc/resolv.conf "$root/../resolv.conf"
    mount --bind "$root/../resolv.conf" "$root/etc/resolv.conf"
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C root
    # Maintainer scripts must not start services.
    printf "#!/bin/sh\nexit 101\n" > "$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    eval "$script"
    rm -f "$root/usr/sbin/policy-rc.d" "$root"/var/cache/apt/*.bin
  ' _ "$lowers" "$d/$name" "$d/$name.work" "$d/merged" "$DEBS" "$WORK/lists" "$script" \
    >"$d/$name.log" 2>&1 || { tail -30 "$d/$name.log" >&2; exit 1; }
  rm -rf "$d/$name.work"
}

# apt_script PKG...: installs the packages that exist in the suite (a name that is gone from
# it is logged and skipped, so one renamed library does not break the build).
apt_script() {
  cat <<EOS
chroot "\$root" apt-get update -qq
pkgs=""
for p in $*; do
  if chroot "\$root" apt-cache show --no-all-versions "\$p" >/dev/null 2>&1; then pkgs="\$pkgs \$p"; else echo "skipping missing package \$p" >&2; fi
done
chroot "\$root" apt-get install -y -qq --no-install-recommends \$pkgs >/dev/null
EOS
}

runtime_pkgs() {
  case $1 in
    jvm) echo openjdk-17-jre-headless ;;
    python) echo python3 python3-pip-whl ;;
    postgres) echo postgresql-15 ;;
    ml) echo python3 python3-venv ;;
  esac
}

# Genuine libraries each service could use; they are what makes the image big.
lib_pkgs() {
  case $1 in
    jvm) echo libguava-java libjackson2-databind-java libjackson2-dataformat-yaml \
      libcommons-lang3-java libcommons-io-java libcommons-collections4-java libcommons-codec-java \
      libcommons-compress-java libcommons-math3-java libslf4j-java liblog4j2-java libnetty-java \
      libjetty9-java libjetty9-extra-java libtomcat9-java libspring-context-java libspring-web-java \
      libspring-jdbc-java libspring-orm-java libhibernate-validator-java libh2-java \
      libpostgresql-jdbc-java libmariadb-java libbcprov-java libbcpkix-java libicu4j-java \
      libbatik-java libfop-java libpdfbox2-java libxalan2-java libxerces2-java libsaxonhe-java \
      libjna-java libasm-java libbyte-buddy-java libgoogle-gson-java libprotobuf-java \
      libhttpclient-java libokhttp-java libjsoup-java libantlr4-runtime-java groovy \
      libeclipse-jdt-core-java scala-library libjruby-joni-java jruby gradle ;;
    python) echo python3-numpy python3-scipy python3-pandas python3-sklearn python3-matplotlib \
      python3-statsmodels python3-sympy python3-networkx python3-h5py python3-pil \
      python3-lxml python3-yaml python3-requests python3-sqlalchemy python3-bs4 ;;
    postgres) echo postgresql-15-postgis-3 postgresql-15-postgis-3-scripts postgis proj-data \
      postgresql-15-pgrouting postgresql-15-pgvector postgresql-plpython3-15 \
      postgresql-plperl-15 postgresql-15-repack ;;
  esac
}

# pip_script: ml's libs layer, as a Dockerfile's `RUN pip install` makes it: a venv in /opt/venv
# with torch from PyPI (its default Linux wheel is the CUDA build, which pulls the nvidia-* wheels:
# cuBLAS, cuDNN, NCCL, ...) and transformers. The wheels are downloaded once into $WHEELS (outside
# the image, like the debs; ~3.3 GB) and installed from there. pip runs with a clean environment
# (the host's PIP_*/REQUESTS_CA_BUNDLE name files the chroot lacks) and the host's CA bundle
# (this sandbox's egress proxy re-signs TLS), from /tmp, which is not kept.
pip_script() {
  local ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  cat <<EOS
chroot "\$root" python3 -m venv /opt/venv
mkdir -p "\$root/tmp/wheels"
mount --bind "$WHEELS" "\$root/tmp/wheels"
cert=""
if [ -f "$ca" ]; then cp "$ca" "\$root/tmp/host-ca.crt"; cert="--cert /tmp/host-ca.crt"; fi
pip() { chroot "\$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \\
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip "\$@"; }
pip download --progress-bar off \$cert -d /tmp/wheels torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION
pip install --no-index --find-links /tmp/wheels torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION
umount "\$root/tmp/wheels"
rm -f "\$root/tmp/host-ca.crt"
EOS
}

libs_script() {
  case $1 in
    ml) pip_script ;;
    *) apt_script "$(lib_pkgs "$1")" ;;
  esac
}

# The JVM app: built with the host's JDK 17 against nothing but the JDK; it loads library
# classes by name, as a framework's startup does, and serializes its reply with Jackson.
JAR=$WORK/jar
mkdir -p "$JAR/src"
cat > "$JAR/src/Main.java" <<'EOJ'
import com.sun.net.httpserver.HttpServer;
import java.lang.reflect.Method;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.TreeMap;

public class Main {
    static final String[] CLASSES = {
        "com.google.common.collect.ImmutableList", "com.google.common.cache.CacheBuilder",
        "org.apache.commons.lang3.StringUtils", "org.apache.commons.io.IOUtils",
        "org.apache.commons.codec.digest.DigestUtils", "org.apache.commons.math3.stat.descriptive.DescriptiveStatistics",
        "org.slf4j.LoggerFactory", "org.apache.logging.log4j.LogManager",
        "io.netty.buffer.ByteBufAllocator", "org.eclipse.jetty.server.Server",
        "org.springframework.context.support.GenericApplicationContext",
        "org.postgresql.Driver", "org.h2.Driver", "com.google.gson.Gson",
        "org.bouncycastle.jce.provider.BouncyCastleProvider",
    };

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(System.getenv().getOrDefault("PORT", "18080"));
        Map<String, String> loaded = new TreeMap<>();
        for (String name : CLASSES) {
            try {
                Class.forName(name);
                loaded.put(name, "ok");
            } catch (Throwable t) {
                loaded.put(name, t.getClass().getSimpleName());
            }
        }
        Object mapper = Class.forName("com.fasterxml.jackson.databind.ObjectMapper").getConstructor().newInstance();
        Method write = mapper.getClass().getMethod("writeValueAsString", Object.class);
        String body = (String) write.invoke(mapper, loaded);
        byte[] reply = body.getBytes(StandardCharsets.UTF_8);
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 16);
        server.createContext("/", ex -> {
            ex.sendResponseHeaders(200, reply.length);
            ex.getResponseBody().write(reply);
            ex.close();
        });
        server.start();
        System.out.println("listening on " + port + " " + body);
    }
}
EOJ
case " ${WORKLOADS[*]} " in
  *" jvm "*)
    javac --release 17 -d "$JAR/classes" "$JAR/src/Main.java"
    jar --create --file "$JAR/app.jar" --main-class Main -C "$JAR/classes" .
    ;;
esac

app_script() {
  case $1 in
    jvm) cat <<EOS
mkdir -p "\$root/app"
cp "$JAR/app.jar" "\$root/app/app.jar"
EOS
      ;;
    python) cat <<'EOS'
mkdir -p "$root/app"
cat > "$root/app/main.py" <<'EOP'
import json
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.signal
import scipy.stats
import sklearn.ensemble
import sklearn.linear_model
import statsmodels.api as sm

rng = np.random.default_rng(8)
x = rng.normal(size=(200, 3))
y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.1, size=200)
frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(y=y)
coef = sklearn.linear_model.LinearRegression().fit(x, y).coef_.round(2).tolist()
ols = sm.OLS(y, sm.add_constant(x)).fit().params.round(2).tolist()
body = json.dumps({"coef": coef, "ols": ols, "rows": len(frame),
                   "t": round(float(scipy.stats.ttest_1samp(y, 0).statistic), 2)}).encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port = int(os.environ.get("PORT", "18081"))
server = HTTPServer(("127.0.0.1", port), Handler)
print("listening on", port, flush=True)
server.serve_forever()
EOP
# matplotlib's font cache, built once here as an image build does, not at every start.
mkdir -p "$root/app/.mpl"
chroot "$root" env MPLCONFIGDIR=/app/.mpl python3 -c 'import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot'
EOS
      ;;
    postgres) cat <<'EOS'
mkdir -p "$root/var/lib/postgresql/data"
chroot "$root" chown postgres:postgres /var/lib/postgresql/data
chroot "$root" su postgres -s /bin/sh -c '/usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/data -E UTF8 --locale=C.UTF-8 -A trust' >/dev/null
cat >> "$root/var/lib/postgresql/data/postgresql.conf" <<'EOP'
listen_addresses = '127.0.0.1'
port = 15432
unix_socket_directories = '/tmp'
shared_preload_libraries = 'pg_stat_statements'
EOP
EOS
      ;;
    ml) cat <<'EOS'
mkdir -p "$root/app"
cat > "$root/app/main.py" <<'EOP'
import json
import os
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

t0 = time.monotonic()
import torch  # loads libtorch and, through it, the CUDA libraries of the nvidia-* wheels
import transformers
from transformers import GPT2LMHeadModel

torch.manual_seed(25)
model = GPT2LMHeadModel.from_pretrained(os.environ.get("MODEL_DIR", "/app/model"))
model.eval()
with torch.no_grad():
    logits = model(torch.arange(32).unsqueeze(0)).logits
with open("/proc/self/maps") as f:
    nvidia = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f if "/nvidia/" in line})
body = json.dumps({
    "torch": torch.__version__, "cuda_build": torch.version.cuda, "transformers": transformers.__version__,
    "params": sum(p.numel() for p in model.parameters()), "next_token": int(logits[0, -1].argmax()),
    "nvidia_libs_mapped": nvidia, "start_s": round(time.monotonic() - t0, 2),
}).encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port = int(os.environ.get("PORT", "18082"))
server = HTTPServer(("127.0.0.1", port), Handler)
print("listening on", port, body.decode(), flush=True)
server.serve_forever()
EOP
# The model, made once here as an image build bakes weights in: GPT-2 small's shape (124M
# parameters, ~475 MiB of fp32 safetensors) with seeded random weights (no hub access here).
cat > "$root/tmp/make_model.py" <<'EOP'
import torch
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(25)
GPT2LMHeadModel(GPT2Config()).save_pretrained("/app/model", safe_serialization=True)
EOP
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 \
  /opt/venv/bin/python /tmp/make_model.py
EOS
      ;;
  esac
}

config() {
  case $1 in
    jvm) jq -cn --arg p "$PATH_ENV" '{Env: ["PATH=\($p)", "JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64", "PORT=18080"],
      Entrypoint: ["java", "-cp", "/app/app.jar:/usr/share/java/guava.jar:/usr/share/java/commons-lang3.jar:/usr/share/java/commons-io.jar:/usr/share/java/commons-codec.jar:/usr/share/java/commons-math3.jar:/usr/share/java/commons-logging.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/log4j-api.jar:/usr/share/java/netty-common.jar:/usr/share/java/netty-buffer.jar:/usr/share/java/jetty9-util.jar:/usr/share/java/jetty9-io.jar:/usr/share/java/jetty9-http.jar:/usr/share/java/jetty9-server.jar:/usr/share/java/servlet-api.jar:/usr/share/java/spring3-core.jar:/usr/share/java/spring3-beans.jar:/usr/share/java/spring3-aop.jar:/usr/share/java/spring3-expression.jar:/usr/share/java/spring3-context.jar:/usr/share/java/postgresql.jar:/usr/share/java/h2.jar:/usr/share/java/gson.jar:/usr/share/java/bcprov.jar:/usr/share/java/jackson-core.jar:/usr/share/java/jackson-annotations.jar:/usr/share/java/jackson-databind.jar", "Main"], WorkingDir: "/app"}' ;;
    python) jq -cn --arg p "$PATH_ENV" '{Env: ["PATH=\($p)", "LANG=C.UTF-8", "MPLCONFIGDIR=/app/.mpl", "PORT=18081"],
      Cmd: ["python3", "/app/main.py"], WorkingDir: "/app"}' ;;
    postgres) jq -cn --arg p "$PATH_ENV" '{Env: ["PATH=/usr/lib/postgresql/15/bin:\($p)", "PGDATA=/var/lib/postgresql/data"],
      Cmd: ["postgres", "-D", "/var/lib/postgresql/data"], User: "postgres", WorkingDir: "/var/lib/postgresql"}' ;;
    ml) jq -cn --arg p "/opt/venv/bin:$PATH_ENV" '{Env: ["PATH=\($p)", "LANG=C.UTF-8", "HF_HOME=/tmp/hf",
      "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_HUB_DISABLE_TELEMETRY=1", "PORT=18082"],
      Cmd: ["python3", "/app/main.py"], WorkingDir: "/app"}' ;;
  esac
}

ready() {
  case $1 in
    jvm) echo "http 18080" ;;
    python) echo "http 18081" ;;
    postgres) echo "log database system is ready to accept connections" ;;
    ml) echo "http 18082" ;;
  esac
}

# check_http W CONFIG PORT LOWERS: starts W's command (CONFIG's Env, WorkingDir, Cmd) in a
# chroot of its layers (LOWERS, top first, with a throwaway upper dir), as root, in the host's
# network namespace, and waits (up to 10 min) for GET / on 127.0.0.1:PORT to answer 200; logs
# the time to ready and the reply. Runs before the layers are tarred.
check_http() {
  local w=$1 cfg=$2 port=$3 lowers=$4 d=$WORK/$1/check
  mkdir -p "$d/upper" "$d/work" "$d/root"
  if curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
    log "$w: check skipped: something already answers on port $port"
    return 0
  fi
  local envs wd cmd
  envs=$(jq -r '.Env[]' <<<"$cfg")
  wd=$(jq -r '.WorkingDir // "/"' <<<"$cfg")
  cmd=$(jq -r '(.Entrypoint // []) + (.Cmd // []) | map(@sh) | join(" ")' <<<"$cfg")
  unshare --mount --fork bash -euo pipefail -c '
    lowers=$1 upper=$2 work=$3 root=$4 envs=$5 wd=$6 cmd=$7 port=$8
    mount --make-rprivate /
    mount -t overlay overlay -o "lowerdir=$lowers,upperdir=$upper,workdir=$work" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mapfile -t e <<<"$envs"
    t0=$(date +%s.%N)
    chroot "$root" env -i "${e[@]}" sh -c "cd $wd && exec $cmd" > "$root/../out.log" 2>&1 &
    pid=$!
    for _ in $(seq 6000); do
      if reply=$(curl -fsS "http://127.0.0.1:$port/" 2>/dev/null); then
        echo "ready in $(echo "$(date +%s.%N) - $t0" | bc) s: $reply"
        kill "$pid"; wait "$pid" 2>/dev/null || true
        exit 0
      fi
      kill -0 "$pid" 2>/dev/null || { echo "exited early:"; tail -20 "$root/../out.log"; exit 1; }
      sleep 0.1
    done
    echo "not ready after 10 min:"; tail -20 "$root/../out.log"; kill "$pid"; exit 1
  ' _ "$lowers" "$d/upper" "$d/work" "$d/root" "$envs" "$wd" "$cmd" "$port" > "$d.log" 2>&1 \
    || { log "$w: check failed"; cat "$d.log" >&2; exit 1; }
  log "$w: check (chroot, warm page cache): $(head -c 600 "$d.log")"
  rm -rf "$d"
}

for w in "${WORKLOADS[@]}"; do
  [ ! -f "$OUT/$w/done" ] || continue
  s=$(date +%s)
  d=$WORK/$w
  log "$w: runtime: $(runtime_pkgs "$w")"
  step "$w" runtime "$BASE" "$(apt_script "$(runtime_pkgs "$w")")"
  log "$w: libs"
  step "$w" libs "$d/runtime:$BASE" "$(libs_script "$w")"
  log "$w: app"
  step "$w" app "$d/libs:$d/runtime:$BASE" "$(app_script "$w")"
  if [ "$w" = ml ]; then
    check_http "$w" "$(config "$w")" "$(ready "$w" | cut -d' ' -f2)" "$d/app:$d/libs:$d/runtime:$BASE"
  fi
  mkdir -p "$OUT/$w"
  : > "$OUT/$w/layers"
  echo base.tar.gz >> "$OUT/$w/layers"
  total=$(cat "$OUT/base.tar.gz.size")
  for l in runtime libs app; do
    rm -rf "$d/$l/tmp"/* "$d/$l/var/cache/apt/archives" "$d/$l/var/lib/apt/lists" "$d/$l/root/.cache"
    overlay_to_oci "$d/$l"
    tar_layer "$d/$l" "$OUT/$w/$l.tar.gz"
    echo "$w/$l.tar.gz" >> "$OUT/$w/layers"
    total=$(( total + $(cat "$OUT/$w/$l.tar.gz.size") ))
  done
  echo "$total" > "$OUT/$w/unpacked-bytes"
  jq -n --argjson c "$(config "$w")" '{architecture: "amd64", os: "linux", config: $c}' > "$OUT/$w/config.json"
  ready "$w" > "$OUT/$w/ready"
  rm -rf "$d"
  echo "$(( $(date +%s) - s ))" > "$OUT/$w/build-seconds"
  touch "$OUT/$w/done"
  log "$w: $(( total >> 20 )) MiB unpacked, $(du -cb "$OUT/base.tar.gz" "$OUT/$w"/*.tar.gz | tail -1 | cut -f1 | awk '{print int($1/1048576)}') MiB compressed, in $(( $(date +%s) - s ))s"
done

rm -rf "$WORK"
echo "$(( $(date +%s) - t0 ))" > "$OUT/build-seconds"
WORKLOADS=("${DEFAULT_WORKLOADS[@]}")
if all_done; then touch "$OUT/done"; fi
log "built in $(( $(date +%s) - t0 ))s: $OUT"
echo "$OUT"
