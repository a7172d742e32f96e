//! Issue 23's acceptance: running containers keep reading their lazily mounted layers while
//! talaria-node is killed, stopped, restarted and replaced (docs/survive.md). Real containerd
//! (CRI) + runc + FUSE + registry; the agent and `talaria-fuse-holder` run as their own
//! processes.
//!
//! - A container checks the SHA-256 of files it never read before, in a loop, while the agent
//!   is SIGKILLed and started again, stopped with SIGTERM and started again, and replaced by
//!   another build (the static release build of `hack/images.sh`): no read fails, no byte is
//!   wrong. The test reads another set of files through the container's root meanwhile and
//!   prints the longest a read waited.
//! - The registry unreachable during a takeover: bytes in the span cache are read at once,
//!   an uncached read waits and completes when the registry is back (within the read timeout).
//! - A new agent that does not know the state version its predecessor wrote (a downgrade):
//!   the predecessor keeps serving, the newcomer is not ready, a metric and an Event say why.
//! - The holder's memory and fds stay flat over 100 takeovers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use talaria_artifact::format::Profile;
use talaria_testenv::cri::{Cri, CriContainerd, CriOptions, CriSnapshotter, PodSandbox};
use talaria_testenv::images::{self, Image, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

mod common;
use common::agent::{Agent, FdHolder};
use common::{http_get, metric};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Files the container checks, and files the test reads itself (each read once: uncached).
const CONTAINER_FILES: usize = 480;
const HOST_FILES: usize = 240;
const FILE_LEN: usize = 40 << 10;
/// Layers of the test image, all mounted lazily.
const LAYERS: u64 = 3;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn content(set: &str, i: usize) -> Vec<u8> {
    let seed = if set == "c" { 10_000 } else { 20_000 };
    images::noise(seed + i as u64, FILE_LEN)
}

fn path_of(set: &str, i: usize) -> String {
    format!("/{set}/{i:04}")
}

/// busybox; the files (container's set, then the test's); their checksums.
fn test_image() -> Image {
    let base = images::busybox_layer_builder()
        .expect("busybox layer")
        .file("etc/talaria-image", "survive\n", 0o644)
        .build()
        .expect("base layer");
    let mut files = LayerBuilder::new().dir("c", 0o755).dir("h", 0o755);
    let mut sums = String::new();
    for i in 0..CONTAINER_FILES {
        let data = content("c", i);
        sums.push_str(&format!(
            "{}  {}\n",
            hex::encode(Sha256::digest(&data)),
            path_of("c", i)
        ));
        files = files.file(&path_of("c", i)[1..], data, 0o644);
    }
    for i in 0..HOST_FILES {
        files = files.file(&path_of("h", i)[1..], content("h", i), 0o644);
    }
    let sums = LayerBuilder::new()
        .dir("check", 0o755)
        .file("check/sums", sums, 0o644)
        .build()
        .expect("sums layer");
    ImageBuilder::new()
        .layer(base)
        .layer(files.build().expect("files layer"))
        .layer(sums)
        .cmd(&["/bin/sh"])
        .build()
        .expect("image")
}

/// Checks every file of /check/sums, pausing between files, pass after pass until /stop
/// exists; prints the totals. A failed or wrong read is printed as BAD.
const READER: &str = "n=0; bad=0; passes=0; \
    while [ ! -e /stop ]; do \
      while read sum f; do \
        got=$(sha256sum \"$f\" 2>&1); \
        if [ \"$got\" = \"$sum  $f\" ]; then n=$((n+1)); else bad=$((bad+1)); echo \"BAD $got\"; fi; \
        sleep 0.02; \
      done < /check/sums; \
      passes=$((passes+1)); \
    done; \
    echo \"checked=$n bad=$bad passes=$passes\"";

/// What the test's own reader saw.
#[derive(Debug, Default)]
struct HostReads {
    read: usize,
    errors: Vec<String>,
    longest: Duration,
}

/// Reads the test's file set through the container's root, one file every 20 ms, until
/// all are read or `stop`.
fn host_reader(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<HostReads> {
    std::thread::spawn(move || {
        let mut r = HostReads::default();
        for i in 0..HOST_FILES {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = Instant::now();
            match fs::read(format!("/proc/{pid}/root{}", path_of("h", i))) {
                Ok(got) if got == content("h", i) => r.read += 1,
                Ok(got) => r
                    .errors
                    .push(format!("{}: {} wrong bytes", path_of("h", i), got.len())),
                Err(e) => r.errors.push(format!("{}: {e}", path_of("h", i))),
            }
            r.longest = r.longest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The static release build of talaria-node (`hack/images.sh` with BUILD_ONLY=1): another
/// build of this source, with other compiler settings.
fn other_build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(root.join("hack/images.sh"))
        .env("BUILD_ONLY", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running hack/images.sh");
    assert!(out.status.success(), "hack/images.sh BUILD_ONLY=1 failed");
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = Path::new(&dir).join("talaria-node");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// A registry with the test image and its artifact, a holder, an agent using both (metrics
/// on a free port) and containerd's CRI on the agent.
struct Setup {
    // Dropped in this order: containerd first, then the agent, the holder, the registry.
    env: CriContainerd,
    node: Agent,
    holder: FdHolder,
    registry: Registry,
    image: String,
    metrics: String,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(name: &str, node_args: &[&str]) -> Setup {
        talaria_artifact::oci::registry::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix(&format!("tlr-survive-{name}-"))
            .tempdir()
            .expect("tempdir");
        let registry = Registry::start().expect("start registry");
        let host = registry.host();
        test_image()
            .push(&host, "talaria/survive", "v1")
            .expect("push");
        common::build_artifact(&host, "talaria/survive", "v1", Profile::StartupLocalV1).await;
        let holder = FdHolder::start(dir.path());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec![
            "--insecure-registry".into(),
            host.clone(),
            "--metrics-addr".into(),
            metrics.clone(),
        ];
        args.extend(holder.agent_args());
        args.extend(node_args.iter().map(|a| a.to_string()));
        let node = Agent::start(dir.path(), &args);
        let env = CriContainerd::start(CriOptions {
            snapshotter: CriSnapshotter::Proxy {
                name: "talaria".into(),
                socket: node.socket.clone(),
            },
            ..CriOptions::default()
        })
        .expect("start containerd with CRI on talaria");
        env.allow_plain_http(&host).expect("plain-HTTP registry");
        Setup {
            env,
            node,
            holder,
            registry,
            image: format!("{host}/talaria/survive:v1"),
            metrics,
            dir,
        }
    }

    async fn cri(&self) -> Cri {
        let cri = self.env.client().await.expect("CRI client");
        cri.pull_image(&self.image).await.expect("pull");
        assert_eq!(
            self.node.fuse_mounts().len() as u64,
            LAYERS,
            "every layer mounted lazily"
        );
        cri
    }

    fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }
}

/// Starts the checking container; returns it with its pid.
async fn start_reader(cri: &Cri, pod: &PodSandbox, image: &str) -> (String, u32) {
    let c = cri
        .start_container(pod, "reader", image, &["sh", "-c", READER])
        .await
        .expect("start the reader");
    (c.id, c.pid)
}

/// Stops the checking container and asserts that every read it made was right.
async fn finish_reader(cri: &Cri, pod: &PodSandbox, id: &str, pid: u32) -> String {
    fs::write(format!("/proc/{pid}/root/stop"), b"").expect("write /stop");
    let status = cri.wait_exited(id, RUN_TIMEOUT).await.expect("reader exit");
    let (out, err) = talaria_testenv::cri::read_container_log(&pod.log_dir.join("reader.log"))
        .expect("reader log");
    assert_eq!(status.exit_code, 0, "reader: {out}{err}");
    let last = out.lines().last().unwrap_or("").to_string();
    assert!(
        !out.contains("BAD") && last.contains(" bad=0 "),
        "the container's reads:\n{out}{err}"
    );
    let checked: usize = last
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checked="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(checked > 0, "the container read nothing: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_through_kills_restarts_and_a_new_build() {
    let _serial = SERIAL.lock().await;
    let other = other_build();
    // With the startup prefetch, busybox (in the image's predicted plan) is copied to local
    // disk and opened with FUSE passthrough: the shell running it keeps it open across the
    // takeovers, and each command it starts opens it again, with the old backing id.
    let mut s = Setup::start("rw", &["--materialize-max-file-kib", "8192"]).await;
    let cri = s.cri().await;
    let pod = cri.run_pod("survive").await.expect("RunPodSandbox");
    let (id, pid) = start_reader(&cri, &pod, &s.image).await;
    let stop = Arc::new(AtomicBool::new(false));
    let host = host_reader(pid, stop.clone());

    let pause = Duration::from_secs(2);
    tokio::time::sleep(pause).await;
    for (i, what) in ["SIGKILL", "SIGTERM", "SIGKILL, then another build"]
        .into_iter()
        .enumerate()
    {
        let t = Instant::now();
        if i == 1 {
            s.node.terminate();
        } else {
            s.node.kill();
        }
        if i == 2 {
            s.node.bin = other.clone();
        }
        s.node.spawn();
        eprintln!("{what}: the next agent serves after {:?}", t.elapsed());
        let m = s.metrics_text();
        assert_eq!(
            metric(&m, "talaria_node_handovers_total{outcome=\"taken\"}"),
            LAYERS as f64,
            "{what}: every mount taken over\n{m}"
        );
        tokio::time::sleep(pause).await;
    }
    let m = s.metrics_text();
    assert!(
        metric(&m, "talaria_node_fuse_requests_total{op=\"read\"}") > 0.0,
        "the last agent served the running container's reads\n{m}"
    );
    // A taken-over mount opens with passthrough only the inodes the previous agent had open
    // that way (noted with the holder).
    assert!(
        metric(&m, "talaria_node_passthrough_opens_total") > 0.0,
        "the last agent reopened a passthrough inode with its backing id\n{m}"
    );
    let summary = finish_reader(&cri, &pod, &id, pid).await;
    stop.store(true, Ordering::Relaxed);
    let h = host.join().expect("host reader");
    eprintln!(
        "container: {summary}; test reader: {} files, longest read {:?}",
        h.read, h.longest
    );
    assert!(h.errors.is_empty(), "the test's reads: {:#?}", h.errors);
    assert!(h.read > 0, "the test read nothing");
    assert_eq!(
        metric(&m, "talaria_node_read_errors_total"),
        0.0,
        "no read answered EIO"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_the_registry_down_serves_cached_bytes_and_waits_for_the_rest() {
    let _serial = SERIAL.lock().await;
    // Uncached stays uncached: nothing is fetched but what reads ask for.
    let mut s = Setup::start("registry", &["--read-timeout", "30s", "--no-prefetch"]).await;
    let cri = s.cri().await;
    let pod = cri.run_pod("survive").await.expect("RunPodSandbox");
    let c = cri
        .start_container(&pod, "sleeper", &s.image, &["sleep", "3600"])
        .await
        .expect("start");
    let read = |i: usize| fs::read(format!("/proc/{}/root{}", c.pid, path_of("h", i)));
    // Into the agent's span cache (on disk), then out of the kernel's page cache: the next
    // reads go to the agent again.
    for i in 0..10 {
        assert_eq!(read(i).expect("first read"), content("h", i));
    }
    fs::write("/proc/sys/vm/drop_caches", b"1").expect("drop the page cache");

    s.registry.stop();
    s.node.kill();
    s.node.spawn();
    for i in 0..10 {
        assert_eq!(
            read(i).expect("a cached read with the registry down"),
            content("h", i),
            "{}",
            path_of("h", i)
        );
    }
    // The first file of the container's set: at the layer's start, in a span nothing
    // fetched (the test's set is at its end).
    let first = 0;
    let pid = c.pid;
    let waiting = std::thread::spawn(move || {
        let t = Instant::now();
        (
            fs::read(format!("/proc/{pid}/root{}", path_of("c", first))),
            t.elapsed(),
        )
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "an uncached read with the registry down waits (it got {:?})",
        waiting.join().map(|r| r.0.map(|b| b.len()))
    );
    s.registry.start_again().expect("registry back");
    let (got, waited) = waiting.join().expect("uncached read");
    assert_eq!(
        got.expect("the uncached read once the registry is back"),
        content("c", first)
    );
    eprintln!("the uncached read waited {waited:?} for the registry");
    let m = s.metrics_text();
    assert_eq!(metric(&m, "talaria_node_read_errors_total"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_know_the_state_leaves_the_mounts_to_their_agent() {
    let _serial = SERIAL.lock().await;
    let kube = talaria_testenv::apiserver::KubeApi::start()
        .await
        .expect("kube-apiserver");
    // The running agent writes a state version newer than this build knows (as a newer
    // agent would, before a rollback to this one).
    let s = Setup::start(
        "version",
        &["--handover-state-version", "2", "--no-prefetch"],
    )
    .await;
    let cri = s.cri().await;
    let pod = cri.run_pod("survive").await.expect("RunPodSandbox");
    let (id, pid) = start_reader(&cri, &pod, &s.image).await;

    // The newcomer starts next to it (an upgrade's surge), on the same root.
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = s.holder.agent_args();
    args.extend([
        "--metrics-addr".into(),
        metrics.clone(),
        "--kubeconfig".into(),
        kube.kubeconfig().display().to_string(),
    ]);
    let newcomer_dir = s.dir.path().join("newcomer");
    fs::create_dir_all(&newcomer_dir).expect("newcomer dir");
    let mut newcomer = Agent::new(&newcomer_dir, &args);
    newcomer.root = s.node.root.clone();
    let mut child = newcomer
        .command()
        .env("NODE_NAME", "survive-node")
        .spawn()
        .expect("spawn the newcomer");
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let m = std::net::TcpStream::connect(&metrics)
            .is_ok()
            .then(|| http_get(&metrics, "/metrics"));
        if let Some(m) = m.filter(|m| metric(m, "talaria_node_unserved_mounts") > 0.0) {
            break m;
        }
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the newcomer exited:\n{}",
            newcomer.log_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "the newcomer never reported:\n{}",
            newcomer.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metric(&text, "talaria_node_unserved_mounts"), LAYERS as f64);
    assert_eq!(
        metric(
            &text,
            "talaria_node_handovers_total{outcome=\"refused_version\"}"
        ),
        LAYERS as f64
    );
    let ready = http_get(&metrics, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.0 503") || ready.starts_with("HTTP/1.1 503"),
        "{ready}"
    );
    // The Event on the Node.
    let client = kube.client().await.expect("kube client");
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(client, "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    let event = loop {
        let list = events.list(&Default::default()).await.expect("list events");
        if let Some(e) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("HandoverRefused"))
        {
            break e;
        }
        assert!(Instant::now() < deadline, "no HandoverRefused Event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let regarding = event.regarding.expect("regarding");
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Node"), Some("survive-node"))
    );
    eprintln!("event: {:?}", event.note);

    // Meanwhile the running agent kept serving, and still does after the newcomer goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = child.kill();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = finish_reader(&cri, &pod, &id, pid).await;
    eprintln!("container: {summary}");
    assert_eq!(
        metric(&s.metrics_text(), "talaria_node_read_errors_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_stays_bounded_over_a_hundred_takeovers() {
    let _serial = SERIAL.lock().await;
    let mut s = Setup::start("bounded", &["--no-prefetch"]).await;
    let _cri = s.cri().await;
    let mut first = None;
    for n in 1..=100 {
        s.node.kill();
        s.node.spawn();
        if n == 1 {
            first = Some((s.holder.rss_kib(), s.holder.fds()));
        }
    }
    let (rss0, fds0) = first.expect("first takeover");
    let (rss, fds) = (s.holder.rss_kib(), s.holder.fds());
    eprintln!("holder after 1 takeover: {rss0} KiB, {fds0} fds; after 100: {rss} KiB, {fds} fds");
    assert_eq!(fds, fds0, "the holder's fds after 100 takeovers");
    assert!(
        rss <= rss0 + 1024,
        "the holder grew from {rss0} KiB to {rss} KiB over 99 takeovers"
    );
    let held = talaria_node::holder::HolderClient::connect(&s.holder.socket)
        .and_then(|c| c.list())
        .expect("list the holder");
    assert_eq!(held.len() as u64, LAYERS, "one entry per mount");
    let m = s.metrics_text();
    assert_eq!(
        metric(&m, "talaria_node_handovers_total{outcome=\"taken\"}"),
        LAYERS as f64,
        "{m}"
    );
    // The mounts still answer.
    let mounts = s.node.fuse_mounts();
    let point = mounts[0].split(' ').nth(4).expect("mount point");
    fs::read_dir(point).expect("a taken-over mount answers");
}
