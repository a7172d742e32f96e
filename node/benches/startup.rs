//! Issue 8's acceptance benchmark: cold start of real Debian workloads (a JVM service, a
//! Python service importing a large library set, PostgreSQL) from PullImage to ready, behind
//! shaped registry links, with containerd's overlayfs snapshotter and with talaria-node (no
//! artifact, default artifact, accelerated artifact).
//!
//! Every run starts from nothing: a fresh containerd (empty content store) and, for talaria, a
//! fresh talaria-node root (empty span cache). Runs are interleaved: run → workload → variant,
//! so a drift of the machine hits all variants alike. Readiness is an HTTP 200 on the
//! workload's port (polled every few ms) or its ready line in the container log.
//!
//! Printed: one table (workload, link, variant, median, p90, speedup against overlayfs), the
//! physical limit per workload and link, and the node's counters per variant (where the time
//! goes). Results are also written as JSON under `~/.cache/talaria/bench-results/`.
//!
//! `hack/bench-startup.sh [--workloads jvm,python,postgres] [--links 1000mbit/5ms,200mbit/20ms]
//! [--variants ...] [--runs 5]` (root: netns, tc, FUSE, containerd). The images come from
//! `hack/workload-images.sh` (`--images DIR`).
//!
//! Setup: images are pushed and artifacts built (with the real analyzer) against an unshaped
//! loopback registry, whose storage is hard-linked into each shaped registry's.

mod common;
mod peers;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use common::{HolderProc, NodeProc, http_get, link_storage, median, percentile};
use peers::{Peer, PeerProc};
use serde_json::json;
use talaria_artifact::build::{BuildOptions, Recorded, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_artifact::startup::StartupTrace;
use talaria_artifact::startup::trace::TracedFile;
use talaria_testenv::cri::{self, Cri, CriContainerd, CriOptions, CriSnapshotter, PodSandbox};
use talaria_testenv::images::{self, Image, Layer};
use talaria_testenv::registry::Registry;

const SNAPSHOTTER: &str = "talaria";
/// How often readiness is probed.
const POLL: Duration = Duration::from_millis(5);
/// Container state is checked this often while waiting, to fail fast on a crashed workload.
const STATUS_EVERY: u32 = 200;
/// Round trips the physical limit counts: TCP connect, image manifest, config, and one round
/// of parallel ranged reads of the startup bytes.
const LIMIT_RTTS: u32 = 4;
const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Parser, Debug)]
#[command(about = "Startup benchmark: PullImage to ready for real workloads, overlayfs vs talaria")]
struct Args {
    /// Output dir of hack/workload-images.sh.
    #[arg(long)]
    images: PathBuf,
    /// Comma-separated workload names (dirs of --images).
    #[arg(long, value_delimiter = ',', default_value = "jvm,python,postgres")]
    workloads: Vec<String>,
    /// Comma-separated link settings, RATEmbit/DELAYms (delay = added round-trip time).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000mbit/5ms,200mbit/20ms"
    )]
    links: Vec<Link>,
    /// Comma-separated: overlayfs, talaria-none, talaria-default, talaria-accelerated,
    /// talaria-recorded, talaria-recorded-proxy, talaria-learned, and the peers (built by
    /// `hack/tools.sh soci stargz`): soci, soci-parallel, stargz, stargz-optimized.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overlayfs,talaria-none,talaria-default,talaria-accelerated,talaria-recorded"
    )]
    variants: Vec<Variant>,
    /// Span size (bytes) of the recorded artifact's indexes.
    #[arg(long, default_value_t = 4 << 20)]
    recorded_span_size: u64,
    /// Span size (bytes) where the recorded start read (0: the indexes are kept).
    #[arg(long, default_value_t = 0)]
    hot_span_size: u64,
    /// The recorded artifact without a startup pack (its plan's spans are fetched).
    #[arg(long)]
    no_pack: bool,
    /// Runs per workload, link and variant.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pulls per link of a 4-layer image of a few bytes (containerd's own pull time: the
    /// floor no snapshotter gets under).
    #[arg(long, default_value_t = 3)]
    floor_runs: usize,
    /// Starts per workload with the image already pulled (the app's own start time).
    #[arg(long, default_value_t = 3)]
    local_runs: usize,
    /// Extra talaria-node flags for every talaria run, whitespace-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    node_args: String,
    /// The talaria-node binary (default: the one cargo built with this bench). A copy keeps a
    /// measurement on one node version while the shared target dir is rebuilt.
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// The talaria-controller binary for talaria-learned (default: next to the node binary;
    /// hack/bench-startup.sh builds it).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Run talaria-node with `talaria-fuse-holder`, as the chart does (its binary next to
    /// --node-bin, or the one cargo built).
    #[arg(long)]
    fuse_holder: bool,
    /// Keep each run's talaria-node and containerd logs here.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Where the JSON results go (default ~/.cache/talaria/bench-results).
    #[arg(long)]
    results_dir: Option<PathBuf>,
    /// Passed by `cargo bench` to harness-less benches; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Link {
    rate_mbit: u32,
    delay_ms: u32,
}

impl std::str::FromStr for Link {
    type Err = String;
    fn from_str(s: &str) -> Result<Link, String> {
        let (rate, delay) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected RATEmbit/DELAYms"))?;
        let rate_mbit = rate
            .trim()
            .trim_end_matches("mbit")
            .parse()
            .map_err(|e| format!("{s:?}: rate: {e}"))?;
        let delay_ms = delay
            .trim()
            .trim_end_matches("ms")
            .parse()
            .map_err(|e| format!("{s:?}: delay: {e}"))?;
        if rate_mbit == 0 {
            return Err(format!("{s:?}: rate must be > 0"));
        }
        Ok(Link {
            rate_mbit,
            delay_ms,
        })
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}mbit/{}ms", self.rate_mbit, self.delay_ms)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Variant {
    Overlayfs,
    TalariaNone,
    TalariaDefault,
    TalariaAccelerated,
    /// The accelerated profile with a plan recorded from one real start (a talaria-node's
    /// /startup-trace, as `talaria build --startup-trace` takes it).
    TalariaRecorded,
    /// The recorded artifact, pulled through talaria-node's CRI image-service proxy (as
    /// kubelet does with `imageService.enabled`): the node starts on the artifact when the
    /// pull begins, not at containerd's first Prepare.
    TalariaRecordedProxy,
    /// The learning loop with no shortcut: a real apiserver, the talaria-controller binary
    /// (it builds the predicted artifact, then the recorded one from the StartupRecord a
    /// talaria-node wrote after one start), nodes resolving through the cluster's pin.
    TalariaLearned,
    /// The SOCI snapshotter lazily loading a SOCI-enabled image (index manifest v2, made by
    /// `soci convert`), with its default background fetch.
    Soci,
    /// SOCI's parallel pull and unpack mode on the unchanged image.
    SociParallel,
    /// The stargz snapshotter on the image converted to eStargz (no prioritized files).
    Stargz,
    /// The stargz snapshotter on an eStargz image whose layers put the files the recorded
    /// start read first (prefetched at mount): the peer of talaria-recorded.
    StargzOptimized,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Overlayfs => "overlayfs",
            Variant::TalariaNone => "talaria-none",
            Variant::TalariaDefault => "talaria-default",
            Variant::TalariaAccelerated => "talaria-accelerated",
            Variant::TalariaRecorded => "talaria-recorded",
            Variant::TalariaRecordedProxy => "talaria-recorded-proxy",
            Variant::TalariaLearned => "talaria-learned",
            Variant::Soci => "soci",
            Variant::SociParallel => "soci-parallel",
            Variant::Stargz => "stargz",
            Variant::StargzOptimized => "stargz-optimized",
        }
    }

    /// One tag per artifact kind; the tags differ only in config, so they share every layer.
    /// (talaria-learned's image is per link: see [`learned_tag`].)
    fn tag(self) -> &'static str {
        match self {
            Variant::Overlayfs | Variant::TalariaNone | Variant::SociParallel => "none",
            Variant::TalariaDefault => "default",
            Variant::TalariaAccelerated => "accelerated",
            Variant::TalariaRecorded | Variant::TalariaRecordedProxy => "recorded",
            Variant::TalariaLearned => "learned",
            Variant::Soci => "soci",
            Variant::Stargz => "stargz",
            Variant::StargzOptimized => "stargz-optimized",
        }
    }

    fn uses_talaria(self) -> bool {
        self != Variant::Overlayfs && self.peer().is_none()
    }

    /// Needs the recorded start's trace (its plan, or its files as stargz's priority list).
    fn recorded(self) -> bool {
        matches!(
            self,
            Variant::TalariaRecorded | Variant::TalariaRecordedProxy | Variant::StargzOptimized
        )
    }

    fn peer(self) -> Option<Peer> {
        match self {
            Variant::Soci => Some(Peer::Soci),
            Variant::SociParallel => Some(Peer::SociParallel),
            Variant::Stargz | Variant::StargzOptimized => Some(Peer::Stargz),
            _ => None,
        }
    }
}

/// Tags pushed, and the artifact built at push time. "recorded" gets the default artifact
/// first, as the controller builds it: its indexes give the recorded build the files'
/// offsets for finer spans where the start read; the accelerated one follows the recording.
const TAGS: [(&str, Option<Profile>); 4] = [
    ("none", None),
    ("default", Some(Profile::Default)),
    ("accelerated", Some(Profile::StartupLocalV1)),
    ("recorded", Some(Profile::Default)),
];

/// The tag of talaria-learned on `link`: an image of its own per link (no artifact pushed
/// here), as the controller pins its artifact in the repository of the registry it built
/// from: the shaped one.
fn learned_tag(link: Link) -> String {
    format!("learned-{}mbit-{}ms", link.rate_mbit, link.delay_ms)
}

/// How a workload says it is ready.
#[derive(Clone, Debug)]
enum Ready {
    /// GET / on 127.0.0.1:PORT answers 200 (the pods share the host network).
    Http(u16),
    /// This text appears in the container's log (stdout or stderr).
    Log(String),
}

/// One workload of hack/workload-images.sh.
struct Workload {
    name: String,
    layers: Vec<Layer>,
    /// Uncompressed tar size per layer.
    unpacked: Vec<u64>,
    /// The image config's `config` object.
    config: serde_json::Value,
    ready: Ready,
}

impl Workload {
    fn repo(&self) -> String {
        format!("talaria/bench-{}", self.name)
    }
    fn compressed_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.blob.len() as u64).sum()
    }
    fn unpacked_bytes(&self) -> u64 {
        self.unpacked.iter().sum()
    }
}

/// talaria-node's counters after a run; `None` where this node version has no such metric.
#[derive(Clone, Debug, Default)]
struct NodeCounters {
    on_demand: Option<f64>,
    prefetched: Option<f64>,
    from_cache: Option<f64>,
    fuse_read: Option<f64>,
    /// FUSE-read bytes converted to compressed bytes with each layer's ratio.
    fuse_read_compressed: Option<f64>,
    read_waits: Option<f64>,
    read_wait_seconds: Option<f64>,
    startup_prefetch_seconds: Option<f64>,
    mount_seconds: Option<f64>,
    fallbacks: Option<f64>,
}

/// One measured cold start.
#[derive(Clone, Debug)]
struct Sample {
    /// The PullImage call.
    pull: Duration,
    /// PullImage start to ready.
    ready: Duration,
    node: NodeCounters,
    /// The node's /startup-trace (recording runs only).
    trace: Option<StartupTrace>,
    /// Bytes the shaped registry sent from PullImage to ready (every variant).
    link_bytes: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(!args.variants.is_empty(), "no --variants");
    ensure!(!args.links.is_empty(), "no --links");
    ensure!(!args.workloads.is_empty(), "no --workloads");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

type Key = (String, String, Variant);

async fn run(args: Args) -> Result<()> {
    talaria_artifact::oci::registry::install_crypto_provider();
    let t_total = Instant::now();
    let mut workloads = Vec::new();
    for name in &args.workloads {
        let w = load_workload(&args.images, name).with_context(|| format!("workload {name}"))?;
        eprintln!(
            "{}: {} layers, {:.0} MiB compressed, {:.0} MiB unpacked, ready {:?}",
            w.name,
            w.layers.len(),
            mib(w.compressed_bytes() as f64),
            mib(w.unpacked_bytes() as f64),
            w.ready
        );
        workloads.push(w);
    }
    let node_args: Vec<String> = args
        .node_args
        .split_whitespace()
        .map(str::to_string)
        .collect();

    let local = Registry::start().context("start the loopback registry")?;
    // The time each tool took to make each variant's artifact, per workload.
    let mut res = Results::default();
    for w in &workloads {
        let t = Instant::now();
        for (v, took) in push_workload(&local.host(), w).await? {
            res.builds.insert((w.name.clone(), v), took.as_secs_f64());
        }
        eprintln!("{}: pushed, artifacts built in {:?}", w.name, t.elapsed());
    }
    {
        let (h, img) = (local.host(), floor_image()?);
        tokio::task::spawn_blocking(move || img.push(&h, FLOOR_REPO, "v1"))
            .await
            .context("push task")?
            .context("push the pull-floor image")?;
    }

    // The app's own start time: image already pulled (overlayfs), container start to ready.
    for w in &workloads {
        let secs = local_start_times(&local.host(), w, args.local_runs)
            .await
            .with_context(|| format!("{}: local start", w.name))?;
        eprintln!("{}: local start {secs:.2?} s", w.name);
        res.local_start.insert(w.name.clone(), secs);
    }

    // The recorded plan: one start against the unshaped registry with recording on (the
    // default), its /startup-trace turned into the "recorded" tag's artifact.
    // What stargz-optimized puts first: the files the recorded start read, in that order.
    let mut read_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // How long the recorded start took (every recorded variant needs one).
    if args.variants.iter().any(|v| v.recorded()) {
        let unshaped = Link {
            rate_mbit: 10_000,
            delay_ms: 0,
        };
        for w in &workloads {
            let s = cold_start(
                w,
                Variant::TalariaDefault,
                "record",
                &local,
                unshaped,
                &node_args,
                &args,
            )
            .await
            .with_context(|| format!("{}: recording run", w.name))?;
            let trace = s.trace.context("the recording run gave no trace")?;
            let gz = gzipped_reads(w, &trace)
                .with_context(|| format!("{}: gzip the recorded reads", w.name))?;
            eprintln!(
                "{}: recorded {} files, {:.1} MiB read ranges, {:.1} MiB gzipped (ready {:.2} s unshaped)",
                w.name,
                trace.files(),
                mib(trace.bytes() as f64),
                mib(gz as f64),
                s.ready.as_secs_f64()
            );
            res.gzipped.insert(w.name.clone(), gz as f64);
            read_order.insert(w.name.clone(), files_in_read_order(&trace));
            res.recording_secs
                .insert(w.name.clone(), s.ready.as_secs_f64());
            let t = Instant::now();
            build_artifact(
                &local.host(),
                &w.repo(),
                "recorded",
                Profile::StartupLocalV1,
                Some((
                    trace,
                    args.recorded_span_size,
                    args.hot_span_size,
                    !args.no_pack,
                )),
            )
            .await?;
            let took = t.elapsed();
            eprintln!("{}: recorded artifact built in {took:?}", w.name);
            for v in [Variant::TalariaRecorded, Variant::TalariaRecordedProxy] {
                res.builds.insert((w.name.clone(), v), took.as_secs_f64());
            }
        }
    }
    for w in &workloads {
        for (v, took) in peer_artifacts(&args.variants, &local.host(), w, &read_order).await? {
            res.builds.insert((w.name.clone(), v), took.as_secs_f64());
        }
    }

    let learn = args.variants.contains(&Variant::TalariaLearned);
    if learn {
        for w in &workloads {
            for link in &args.links {
                let (h, repo, tag) = (local.host(), w.repo(), learned_tag(*link));
                let image = image_for(w, &tag)?;
                tokio::task::spawn_blocking(move || image.push(&h, &repo, &tag))
                    .await
                    .context("push task")?
                    .with_context(|| format!("push {}:{}", w.repo(), learned_tag(*link)))?;
            }
        }
    }

    for link in &args.links {
        let shaped = Registry::start_shaped(link.rate_mbit, link.delay_ms)
            .with_context(|| format!("start the shaped registry ({link})"))?;
        link_storage(&local.storage_dir(), &shaped.storage_dir())?;
        let host = shaped.host();
        eprintln!("registry {host} behind {link}");
        if args.floor_runs > 0 {
            let secs = pull_floor(&host, args.floor_runs)
                .await
                .with_context(|| format!("containerd's pull floor ({link})"))?;
            eprintln!("{link}: containerd pull floor (4 layers of a few bytes) {secs:.2?} s");
            res.floor.insert(link.to_string(), secs);
        }
        for w in &workloads {
            if res.probes.contains_key(&w.name) {
                continue;
            }
            let mut a = node_args.clone();
            a.push("--no-prefetch".into());
            let s = cold_start(
                w,
                Variant::TalariaDefault,
                "probe",
                &shaped,
                *link,
                &a,
                &args,
            )
            .await
            .with_context(|| format!("{}: --no-prefetch probe", w.name))?;
            eprintln!(
                "{}: probe (talaria-default --no-prefetch) ready {:.2} s, FUSE read {}, on demand {}",
                w.name,
                s.ready.as_secs_f64(),
                fmt_mib(s.node.fuse_read),
                fmt_mib(s.node.on_demand)
            );
            res.probes.insert(w.name.clone(), s.node);
        }
        // The learned plans: the controller builds them from one start's StartupRecord.
        let learning = if learn {
            Some(
                Learning::start(&args, &shaped, *link, &workloads, &node_args)
                    .await
                    .with_context(|| format!("talaria-learned ({link}): the learning loop"))?,
            )
        } else {
            None
        };
        let learned_args: Vec<String> = match &learning {
            Some(l) => l.node_args(&node_args),
            None => Vec::new(),
        };
        for run in 0..args.runs {
            for w in &workloads {
                for v in &args.variants {
                    let t = Instant::now();
                    let label = format!("{run}");
                    let a = if *v == Variant::TalariaLearned {
                        &learned_args
                    } else {
                        &node_args
                    };
                    let s = cold_start(w, *v, &label, &shaped, *link, a, &args)
                        .await
                        .with_context(|| format!("{} {link} run {run} {}", w.name, v.name()))?;
                    eprintln!(
                        "{link} run {run} {:<9} {:<20} ready {:>7.2} s (pull {:>6.2} s; on demand {}, \
                         prefetched {}, FUSE read {}) [run took {:.1} s]",
                        w.name,
                        v.name(),
                        s.ready.as_secs_f64(),
                        s.pull.as_secs_f64(),
                        fmt_mib(s.node.on_demand),
                        fmt_mib(s.node.prefetched),
                        fmt_mib(s.node.fuse_read),
                        t.elapsed().as_secs_f64()
                    );
                    res.samples
                        .entry((w.name.clone(), link.to_string(), *v))
                        .or_default()
                        .push(s);
                }
            }
            // The cells so far, in case a long invocation is cut short.
            let report = Report {
                args: &args,
                workloads: &workloads,
                r: &res,
            };
            if let Err(e) = report.write_partial() {
                eprintln!("partial results not written: {e:#}");
            }
        }
        drop(learning);
    }
    let wall = t_total.elapsed();
    let report = Report {
        args: &args,
        workloads: &workloads,
        r: &res,
    };
    println!(
        "\nstartup benchmark, {} runs per cell, wall time {:.1} min\n",
        args.runs,
        wall.as_secs_f64() / 60.0
    );
    print!("{}", report.table());
    println!();
    print!("{}", report.limits());
    println!();
    print!("{}", report.where_time_goes());
    let path = report.write_json(wall)?;
    println!("\nresults: {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Workloads and artifacts

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn load_workload(dir: &Path, name: &str) -> Result<Workload> {
    let wdir = dir.join(name);
    let mut layers = Vec::new();
    let mut unpacked = Vec::new();
    for rel in read_text(&wdir.join("layers"))?.lines().map(str::trim) {
        if rel.is_empty() {
            continue;
        }
        let path = dir.join(rel);
        let blob = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let diff_id = read_text(&dir.join(format!("{rel}.diffid")))?
            .trim()
            .to_string();
        ensure!(
            diff_id.starts_with("sha256:"),
            "bad diff id in {rel}.diffid"
        );
        let size: u64 = read_text(&dir.join(format!("{rel}.size")))?
            .trim()
            .parse()
            .with_context(|| format!("{rel}.size"))?;
        layers.push(Layer {
            digest: images::sha256_digest(&blob),
            diff_id,
            blob,
        });
        unpacked.push(size);
    }
    ensure!(!layers.is_empty(), "no layers listed in {}", wdir.display());
    let config: serde_json::Value = serde_json::from_str(&read_text(&wdir.join("config.json"))?)
        .context("config.json is not JSON")?;
    let config = config
        .get("config")
        .cloned()
        .context("config.json has no \"config\"")?;
    let ready_text = read_text(&wdir.join("ready"))?;
    let ready = match ready_text.trim().split_once(' ') {
        Some(("http", port)) => Ready::Http(port.parse().context("ready: bad port")?),
        Some(("log", text)) if !text.is_empty() => Ready::Log(text.to_string()),
        _ => bail!("ready: unknown probe {ready_text:?}"),
    };
    Ok(Workload {
        name: name.to_string(),
        layers,
        unpacked,
        config,
        ready,
    })
}

/// The image of `w` for `tag`: its config plus an env var naming the tag.
fn image_for(w: &Workload, tag: &str) -> Result<Image> {
    let mut cfg = w.config.clone();
    let env = cfg
        .as_object_mut()
        .context("config is not an object")?
        .entry("Env")
        .or_insert_with(|| json!([]));
    env.as_array_mut()
        .context("Env is not a list")?
        .push(json!(format!("BENCH_IMAGE={tag}")));
    let config = json!({
        "created": "2026-11-23T00:00:00Z",
        "architecture": images::oci_arch(),
        "os": "linux",
        "config": cfg,
        "rootfs": {
            "type": "layers",
            "diff_ids": w.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": images::sha256_digest(&config),
            "size": config.len(),
        },
        "layers": w.layers.iter().map(|l| json!({
            "mediaType": MEDIA_TYPE_LAYER_GZIP,
            "digest": l.digest,
            "size": l.blob.len(),
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest)?;
    Ok(Image {
        config_digest: images::sha256_digest(&config),
        manifest_digest: images::sha256_digest(&manifest),
        config,
        manifest,
        // Cloning ~300 MiB once per tag; the push only needs the blobs.
        layers: w.layers.clone(),
    })
}

/// Pushes every tag of `w` and builds its talaria artifacts; returns each build's time.
async fn push_workload(host: &str, w: &Workload) -> Result<Vec<(Variant, Duration)>> {
    let mut builds = Vec::new();
    for (tag, profile) in TAGS {
        let image = image_for(w, tag)?;
        let repo = w.repo();
        let h = host.to_string();
        tokio::task::spawn_blocking(move || image.push(&h, &repo, tag))
            .await
            .context("push task")?
            .with_context(|| format!("push {}:{tag}", w.repo()))?;
        if let Some(p) = profile {
            let t = Instant::now();
            build_artifact(host, &w.repo(), tag, p, None).await?;
            let variant = match tag {
                "default" => Some(Variant::TalariaDefault),
                "accelerated" => Some(Variant::TalariaAccelerated),
                _ => None,
            };
            builds.extend(variant.map(|v| (v, t.elapsed())));
        }
    }
    Ok(builds)
}

/// Makes the peers' artifacts of `w` that `variants` need (on the loopback registry `host`):
/// the SOCI-enabled image, the eStargz images; returns each tool's time.
async fn peer_artifacts(
    variants: &[Variant],
    host: &str,
    w: &Workload,
    read_order: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<(Variant, Duration)>> {
    let mut out = Vec::new();
    for v in variants {
        let (h, repo, tag) = (host.to_string(), w.repo(), v.tag());
        let source = format!("{host}/{repo}:none");
        let target = format!("{host}/{repo}:{tag}");
        let took = match v {
            Variant::Soci => {
                let image = image_for(w, tag)?;
                tokio::task::spawn_blocking(move || peers::soci_convert(&image, &h, &repo, tag))
                    .await
                    .context("soci convert task")?
            }
            Variant::Stargz => {
                tokio::task::spawn_blocking(move || peers::estargz_convert(&source, &target, None))
                    .await
                    .context("estargz convert task")?
            }
            Variant::StargzOptimized => {
                let files = read_order
                    .get(&w.name)
                    .cloned()
                    .context("stargz-optimized without a recorded start")?;
                tokio::task::spawn_blocking(move || {
                    peers::estargz_convert(&source, &target, Some(&files))
                })
                .await
                .context("estargz convert task")?
            }
            _ => continue,
        }
        .with_context(|| format!("{}: the {} artifact", w.name, v.name()))?;
        eprintln!("{}: {} artifact made in {took:?}", w.name, v.name());
        out.push((*v, took));
    }
    Ok(out)
}

/// The files a recorded start read, each once, in the order it first read them.
fn files_in_read_order(trace: &StartupTrace) -> Vec<String> {
    let mut files: Vec<&TracedFile> = trace.layers.iter().flat_map(|l| &l.files).collect();
    files.sort_by_key(|f| f.first_ms);
    let mut seen = std::collections::HashSet::new();
    files
        .into_iter()
        .filter(|f| seen.insert(f.path.as_str()))
        .map(|f| f.path.clone())
        .collect()
}

async fn build_artifact(
    host: &str,
    repo: &str,
    tag: &str,
    profile: Profile,
    recorded: Option<(StartupTrace, u64, u64, bool)>,
) -> Result<()> {
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![host.to_string()],
        ..RegistryConfig::default()
    })?;
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: host.to_string(),
            name: repo.to_string(),
        },
    ));
    let mut opts = BuildOptions {
        profile,
        ..BuildOptions::default()
    };
    if let Some((trace, span_size, hot_span_size, pack)) = recorded {
        opts.knobs.span_size = span_size;
        opts.recorded = Some(Arc::new(Recorded {
            trace,
            hot_span_size,
            pack,
            budget: Some(talaria_artifact::build::DEFAULT_RECORDED_BUDGET),
        }));
    }
    let summary = build(store.clone(), tag, None, &opts)
        .await
        .with_context(|| format!("build the {} artifact of {repo}:{tag}", profile.name()))?;
    ensure!(
        summary.layers.iter().all(|l| l.index.is_some()),
        "a layer of {repo} was not indexed: {:?}",
        summary.layers
    );
    // The indexes are on every start's path (each mount waits for its layer's); their
    // windows only where a span is inflated.
    let index_bytes: u64 = summary
        .layers
        .iter()
        .filter_map(|l| l.index.as_ref().map(|d| d.size))
        .sum();
    let windows_bytes: u64 = summary
        .layers
        .iter()
        .filter_map(|l| l.windows.as_ref().map(|d| d.size))
        .sum();
    eprintln!(
        "{repo}:{tag}: {} artifact, indexes {:.2} MiB (+ windows {:.2} MiB, fetched as spans need them)",
        profile.name(),
        mib(index_bytes as f64),
        mib(windows_bytes as f64)
    );
    if opts.recorded.is_some()
        && let Some(d) = &summary.plan
    {
        let plan: talaria_artifact::startup::plan::StartupPlan =
            serde_json::from_slice(&store.get_blob(&d.digest, 64 << 20).await?)?;
        if let Some(t) = &plan.pack {
            // What the pack holds, biggest files first: where its bytes go.
            let mut per_file: BTreeMap<&str, u64> = BTreeMap::new();
            for r in t.chunks.iter().flat_map(|c| &c.records) {
                *per_file.entry(r.path.as_str()).or_default() += r.len;
            }
            let mut top: Vec<(&str, u64)> = per_file.into_iter().collect();
            top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            let top: Vec<String> = top
                .iter()
                .take(5)
                .map(|(p, n)| format!("{p} {:.1} MiB", mib(*n as f64)))
                .collect();
            eprintln!(
                "{repo}: pack {:.1} MiB of {} files, {:.1} MiB compressed in {} chunks; plan blob {:.2} MiB; most: {}",
                mib(t.bytes() as f64),
                t.files(),
                mib(t.size as f64),
                t.chunks.len(),
                mib(d.size as f64),
                top.join(", ")
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Runs

/// Waits until `w` is ready in container `id` of `pod`, or fails after `timeout` or when the
/// container exits. Returns when the probe first succeeded.
async fn wait_ready(
    cri: &Cri,
    pod: &PodSandbox,
    id: &str,
    w: &Workload,
    timeout: Duration,
) -> Result<Instant> {
    let log = pod.log_dir.join("app.log");
    let t = Instant::now();
    let mut polls: u32 = 0;
    loop {
        let ok = match &w.ready {
            Ready::Http(port) => http_ok(*port),
            Ready::Log(text) => {
                log.exists() && {
                    let (out, err) = cri::read_container_log(&log)?;
                    out.contains(text.as_str()) || err.contains(text.as_str())
                }
            }
        };
        if ok {
            return Ok(Instant::now());
        }
        polls += 1;
        if polls.is_multiple_of(STATUS_EVERY) || t.elapsed() > timeout {
            let (status, _) = cri.container_status(id, false).await?;
            let exited = status.state == cri::proto::ContainerState::ContainerExited as i32;
            if exited || t.elapsed() > timeout {
                let (out, err) = cri::read_container_log(&log).unwrap_or_default();
                bail!(
                    "{} not ready after {:?} (state {} exit {}): stdout {:?} stderr {:?}",
                    w.name,
                    t.elapsed(),
                    status.state,
                    status.exit_code,
                    tail(&out),
                    tail(&err)
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(2000);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s.get(start..).unwrap_or("")
}

/// GET / on 127.0.0.1:PORT answered 200.
fn http_ok(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let mut got = 0;
    while got < head.len() {
        match s.read(head.get_mut(got..).unwrap_or_default()) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head.get(..got)
        .is_some_and(|h| h.starts_with(b"HTTP/1.") && h.get(9..12) == Some(b"200"))
}

/// The app's own start time: one containerd (overlayfs), the image pulled from the unshaped
/// registry once, then `runs` container starts, each timed from CreateContainer to ready.
const FLOOR_REPO: &str = "talaria/bench-floor";

/// Four layers of one small file each: what containerd's pull costs when the bytes do not.
fn floor_image() -> Result<Image> {
    let mut b = images::ImageBuilder::new();
    for i in 0..4 {
        b = b.layer(
            images::LayerBuilder::new()
                .file(&format!("floor/{i}"), format!("layer {i}\n"), 0o644)
                .build()?,
        );
    }
    Ok(b.cmd(&["/floor/0"]).build()?)
}

/// A fresh containerd with overlayfs that pulls from `host`, and its CRI client.
async fn overlayfs_cri(host: &str, pull_timeout: Duration) -> Result<(CriContainerd, Cri)> {
    let env = CriContainerd::start(CriOptions::default()).context("start containerd")?;
    env.allow_plain_http(host)?;
    let cri = env
        .client()
        .await?
        .with_timeouts(Duration::from_secs(120), pull_timeout);
    Ok((env, cri))
}

/// containerd's PullImage time of the floor image over the link, fresh containerd each run.
async fn pull_floor(host: &str, runs: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let (_env, cri) = overlayfs_cri(host, Duration::from_secs(120)).await?;
        let image = format!("{host}/{FLOOR_REPO}:v1");
        let t0 = Instant::now();
        cri.pull_image(&image).await.context("PullImage")?;
        out.push(t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

async fn local_start_times(host: &str, w: &Workload, runs: usize) -> Result<Vec<f64>> {
    let (_env, cri) = overlayfs_cri(host, Duration::from_secs(600)).await?;
    let image = format!("{host}/{}:none", w.repo());
    cri.pull_image(&image).await.context("PullImage")?;
    let mut out = Vec::new();
    for _ in 0..runs.max(1) {
        let pod = cri.run_pod("local").await.context("RunPodSandbox")?;
        let t0 = Instant::now();
        let id = cri
            .create_container(&pod, Cri::container_config("app", &image, &[]))
            .await?;
        cri.start_container_id(&id).await?;
        let at = wait_ready(&cri, &pod, &id, w, Duration::from_secs(300)).await?;
        out.push(at.duration_since(t0).as_secs_f64());
        cri.remove_pod(&pod).await.context("RemovePodSandbox")?;
    }
    Ok(out)
}

async fn cold_start(
    w: &Workload,
    variant: Variant,
    label: &str,
    registry: &Registry,
    link: Link,
    node_args: &[String],
    args: &Args,
) -> Result<Sample> {
    let host = &registry.host();
    let dir = tempfile::Builder::new()
        .prefix("tlr-bench-startup-")
        .tempdir()
        .context("tempdir")?;
    let metrics_addr = format!("127.0.0.1:{}", talaria_testenv::free_port()?);
    // The node's image-service proxy (and SOCI's parallel mode) reach containerd through this
    // link, made once containerd (started after its snapshotter) is up.
    let containerd_link = dir.path().join("containerd.sock");
    let proxy_socket = dir.path().join("images.sock");
    let via_proxy = variant == Variant::TalariaRecordedProxy;
    // Declared before the node: dropped after it.
    let holder = if args.fuse_holder && variant.uses_talaria() {
        let bin = match &args.node_bin {
            Some(b) => b.with_file_name("talaria-fuse-holder"),
            None => PathBuf::from(env!("CARGO_BIN_EXE_talaria-fuse-holder")),
        };
        Some(HolderProc::start(&bin, dir.path())?)
    } else {
        None
    };
    let node = if variant.uses_talaria() {
        let mut a = vec![
            "--insecure-registry".to_string(),
            host.to_string(),
            "--metrics-addr".to_string(),
            metrics_addr.clone(),
        ];
        if via_proxy {
            a.extend([
                "--image-service-socket".to_string(),
                proxy_socket.display().to_string(),
                "--containerd-socket".to_string(),
                containerd_link.display().to_string(),
            ]);
        }
        if let Some(h) = &holder {
            a.extend(h.node_args());
        }
        a.extend_from_slice(node_args);
        let bin = args
            .node_bin
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_talaria-node")));
        Some(NodeProc::start(&bin, dir.path(), &a)?)
    } else {
        None
    };
    let peer = match variant.peer() {
        Some(p) => Some(PeerProc::start(p, dir.path(), host, &containerd_link)?),
        None => None,
    };
    let (snapshotter, extra_config) = match (&node, &peer) {
        (Some(n), _) => (
            CriSnapshotter::Proxy {
                name: SNAPSHOTTER.into(),
                socket: n.socket.clone(),
            },
            String::new(),
        ),
        (None, Some(p)) => (p.snapshotter(), p.containerd_config()),
        (None, None) => (CriSnapshotter::Overlayfs, String::new()),
    };
    let env = CriContainerd::start(CriOptions {
        snapshotter,
        extra_config,
    })
    .context("start containerd with CRI")?;
    env.allow_plain_http(host)?;
    if peer.is_some() {
        std::os::unix::fs::symlink(env.socket(), &containerd_link)
            .context("link containerd's socket for the peer")?;
    }
    // The whole image over the link three times, never under 10 minutes.
    let timeout = Duration::from_secs(
        (w.compressed_bytes() * 8 * 3 / (u64::from(link.rate_mbit) * 1_000_000)).max(600),
    );
    let cri = env
        .client()
        .await?
        .with_timeouts(Duration::from_secs(120), timeout);
    // The sandbox exists before the pull, as kubelet creates it first.
    let pod = cri.run_pod("startup").await.context("RunPodSandbox")?;
    let tag = match variant {
        Variant::TalariaLearned => learned_tag(link),
        v => v.tag().to_string(),
    };
    let image = format!("{host}/{}:{tag}", w.repo());
    let images = if via_proxy {
        std::os::unix::fs::symlink(env.socket(), &containerd_link)
            .context("link containerd's socket for the proxy")?;
        let t = Instant::now();
        while !proxy_socket.exists() {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "no image-service proxy socket"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Some(
            Cri::connect(&proxy_socket, &env.pod_log_root())
                .await
                .context("CRI client of the image-service proxy")?
                .with_timeouts(Duration::from_secs(120), timeout),
        )
    } else {
        None
    };

    let sent_before = registry.bytes_sent();
    let t0 = Instant::now();
    images
        .as_ref()
        .unwrap_or(&cri)
        .pull_image(&image)
        .await
        .context("PullImage")?;
    let pull = t0.elapsed();
    let id = cri
        .create_container(&pod, Cri::container_config("app", &image, &[]))
        .await
        .context("CreateContainer")?;
    cri.start_container_id(&id)
        .await
        .context("StartContainer")?;
    let ready = wait_ready(&cri, &pod, &id, w, timeout)
        .await?
        .duration_since(t0);
    let link_bytes = registry
        .bytes_sent()
        .zip(sent_before)
        .map(|(after, before)| after.saturating_sub(before));
    let metrics = if node.is_some() {
        http_get(&metrics_addr, "/metrics").context("scrape talaria-node metrics")?
    } else {
        String::new()
    };
    if label == LEARN_RUN {
        // The node writes its record once the policy's window after the first Prepare ends.
        let t = Instant::now();
        loop {
            let m = http_get(&metrics_addr, "/metrics").context("scrape talaria-node metrics")?;
            if metric_lines(&m, "talaria_node_startup_records")
                .iter()
                .any(|(l, v)| l.contains("outcome=\"written\"") && *v >= 1.0)
            {
                break;
            }
            ensure!(
                t.elapsed() < LEARN_WINDOW + Duration::from_secs(60),
                "{}: no StartupRecord written: {:?}",
                w.name,
                metric_lines(&m, "talaria_node_startup_records")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let trace = if node.is_some() && label == "record" {
        let resp = http_get(&metrics_addr, "/startup-trace").context("get /startup-trace")?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("no HTTP body")?;
        Some(StartupTrace::from_json(body.as_bytes()).context("parse /startup-trace")?)
    } else {
        None
    };
    let _ = cri.remove_pod(&pod).await;
    if let Some(keep) = &args.keep_logs {
        std::fs::create_dir_all(keep).with_context(|| format!("create {}", keep.display()))?;
        let prefix =
            keep.join(format!("{}-{link}-{label}-{}", w.name, variant.name()).replace('/', "_"));
        let _ = std::fs::copy(
            env.containerd().log_path(),
            prefix.with_extension("containerd.log"),
        );
        if let Some(n) = &node {
            let _ = std::fs::copy(&n.log, prefix.with_extension("node.log"));
            let _ = std::fs::write(prefix.with_extension("metrics.txt"), &metrics);
        }
        if let Some(p) = &peer {
            let _ = std::fs::copy(&p.log, prefix.with_extension("peer.log"));
        }
    }
    let t_down = Instant::now();
    drop(env);
    drop(node);
    drop(peer);
    drop(dir);
    eprintln!(
        "  ({} {}: teardown {:.1} s)",
        w.name,
        variant.name(),
        t_down.elapsed().as_secs_f64()
    );
    Ok(Sample {
        pull,
        ready,
        node: if variant.uses_talaria() {
            counters(&metrics, w)
        } else {
            NodeCounters::default()
        },
        trace,
        link_bytes,
    })
}

// ---------------------------------------------------------------------------------------
// The learning loop (talaria-learned)

/// The label of the start the learning loop records.
const LEARN_RUN: &str = "learn";
/// The bench policy's `recording.windowSeconds`: long enough for the start and its first
/// readiness probes.
const LEARN_WINDOW: Duration = Duration::from_secs(10);

/// A real apiserver and the talaria-controller binary, with a policy selecting every
/// workload's "learned" tag; after [`Learning::start`], each of those images has its recorded
/// plan pinned.
struct Learning {
    controller: std::process::Child,
    api: talaria_testenv::apiserver::KubeApi,
    _dir: tempfile::TempDir,
}

impl Drop for Learning {
    fn drop(&mut self) {
        let _ = self.controller.kill();
        let _ = self.controller.wait();
    }
}

impl Learning {
    async fn start(
        args: &Args,
        registry: &Registry,
        link: Link,
        workloads: &[Workload],
        node_args: &[String],
    ) -> Result<Learning> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        use kube::Api;
        use kube::api::PostParams;
        let host = &registry.host();
        let t0 = Instant::now();
        let api = talaria_testenv::apiserver::KubeApi::start()
            .await
            .context("start etcd and kube-apiserver")?;
        let client = api.client().await.context("apiserver client")?;
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let crd: CustomResourceDefinition =
                serde_saphyr::from_str(&read_text(&e?.path())?).context("CRD YAML")?;
            crds.create(&PostParams::default(), &crd)
                .await
                .context("create a CRD")?;
        }
        // Established before the controller watches them.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bin = args.controller_bin.clone().unwrap_or_else(|| {
            args.node_bin
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_talaria-node")))
                .with_file_name("talaria-controller")
        });
        let tmp = tempfile::Builder::new()
            .prefix("tlr-bench-learn-")
            .tempdir()
            .context("tempdir")?;
        let log = std::fs::File::create(tmp.path().join("controller.log"))?;
        let controller = std::process::Command::new(&bin)
            .env("KUBECONFIG", api.kubeconfig())
            .args(["--insecure-registry", host, "--leader-elect", "false"])
            .args(["--log-format", "text", "--http-addr"])
            .arg(format!("127.0.0.1:{}", talaria_testenv::free_port()?))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("spawn {} (hack/bench-startup.sh builds it)", bin.display())
            })?;
        let mut me = Learning {
            controller,
            api,
            _dir: tmp,
        };
        let images: Vec<String> = workloads
            .iter()
            .map(|w| format!("{host}/{}:{}", w.repo(), learned_tag(link)))
            .collect();
        let policy = json!({
            "apiVersion": "talaria.dev/v1alpha1",
            "kind": "AccelerationPolicy",
            "metadata": { "name": "bench" },
            "spec": {
                "images": images,
                "recording": { "windowSeconds": LEARN_WINDOW.as_secs(), "starts": 1 },
            },
        });
        let policies = dynamic(&client, "AccelerationPolicy");
        policies
            .create(
                &PostParams::default(),
                &serde_json::from_value(policy).context("policy")?,
            )
            .await
            .context("create the bench policy")?;
        me.wait_plans(&client, workloads, host, "predicted").await?;
        eprintln!(
            "talaria-learned: predicted artifacts built by the controller in {:.1?}",
            t0.elapsed()
        );
        let a = me.node_args(node_args);
        for w in workloads {
            let t = Instant::now();
            cold_start(
                w,
                Variant::TalariaLearned,
                LEARN_RUN,
                registry,
                link,
                &a,
                args,
            )
            .await
            .with_context(|| format!("{}: the recorded start", w.name))?;
            eprintln!(
                "{}: start recorded by talaria-node in {:.1?}",
                w.name,
                t.elapsed()
            );
        }
        let t = Instant::now();
        me.wait_plans(&client, workloads, host, "recorded").await?;
        eprintln!(
            "talaria-learned: recorded plans built and pinned by the controller in {:.1?}",
            t.elapsed()
        );
        Ok(me)
    }

    /// A node's flags to resolve through this cluster.
    fn node_args(&self, node_args: &[String]) -> Vec<String> {
        let mut a = node_args.to_vec();
        a.extend([
            "--kubeconfig".into(),
            self.api.kubeconfig().display().to_string(),
        ]);
        a
    }

    /// Waits until every workload's "learned" AcceleratedImage is Ready with `plan_source`.
    async fn wait_plans(
        &mut self,
        client: &kube::Client,
        workloads: &[Workload],
        host: &str,
        plan_source: &str,
    ) -> Result<()> {
        let accimgs = dynamic(client, "AcceleratedImage");
        let t = Instant::now();
        loop {
            let list = accimgs.list(&Default::default()).await.context("list")?;
            let done = workloads.iter().all(|w| {
                let repo = format!("{host}/{}", w.repo());
                list.items.iter().any(|o| {
                    o.data["spec"]["image"] == repo.as_str()
                        && o.data["status"]["phase"] == "Ready"
                        && o.data["status"]["planSource"] == plan_source
                })
            });
            if done {
                return Ok(());
            }
            if let Some(status) = self.controller.try_wait()? {
                bail!("talaria-controller exited with {status}");
            }
            let failed: Vec<String> = list
                .items
                .iter()
                .filter_map(|o| o.data["status"]["lastError"].as_str().map(str::to_string))
                .collect();
            ensure!(
                t.elapsed() < Duration::from_secs(1800),
                "AcceleratedImages not {plan_source} after 30 min: {failed:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn dynamic(client: &kube::Client, kind: &str) -> kube::Api<kube::api::DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("talaria.dev", "v1alpha1", kind);
    kube::Api::all_with(client.clone(), &kube::api::ApiResource::from_gvk(&gvk))
}

// ---------------------------------------------------------------------------------------
// Metrics (parsed defensively: a metric this node version lacks is `None`, printed "n/a")

/// (labels, value) of every sample of metric `name` (also as `name_total`, the counter form).
fn metric_lines<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    let total = format!("{name}_total");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (series, ""),
            };
            if metric != name && metric != total {
                return None;
            }
            Some((labels, value.parse::<f64>().ok()?))
        })
        .collect()
}

fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let lines = metric_lines(text, name);
    // A fold from +0.0: an empty f64 `sum` is -0.0.
    (!lines.is_empty()).then(|| lines.iter().fold(0.0, |a, (_, v)| a + v))
}

fn counters(text: &str, w: &Workload) -> NodeCounters {
    let fuse = metric_lines(text, "talaria_node_fuse_read_bytes");
    let fuse_read_compressed = (!fuse.is_empty()).then(|| {
        let image_ratio = w.compressed_bytes() as f64 / w.unpacked_bytes().max(1) as f64;
        fuse.iter().fold(0.0, |acc, (labels, v)| {
            // A per-layer series names its layer's digest; otherwise the image's ratio.
            let ratio = w
                .layers
                .iter()
                .zip(&w.unpacked)
                .find(|(l, _)| {
                    let hex = l.digest.trim_start_matches("sha256:");
                    hex.get(..12).is_some_and(|h| labels.contains(h))
                })
                .map_or(image_ratio, |(l, u)| {
                    l.blob.len() as f64 / (*u).max(1) as f64
                });
            acc + v * ratio
        })
    });
    NodeCounters {
        on_demand: metric_sum(text, "talaria_node_fetched_on_demand_bytes"),
        prefetched: metric_sum(text, "talaria_node_prefetched_bytes"),
        from_cache: metric_sum(text, "talaria_node_from_cache_bytes"),
        fuse_read: metric_sum(text, "talaria_node_fuse_read_bytes"),
        fuse_read_compressed,
        read_waits: metric_sum(text, "talaria_node_read_wait_seconds_count"),
        read_wait_seconds: metric_sum(text, "talaria_node_read_wait_seconds_sum"),
        startup_prefetch_seconds: metric_sum(text, "talaria_node_startup_prefetch_seconds_sum"),
        mount_seconds: metric_sum(text, "talaria_node_mount_seconds_sum"),
        fallbacks: metric_sum(text, "talaria_node_fallbacks"),
    }
}

/// The recorded read ranges gzip-compressed (default level, one stream per layer, in archive
/// order): what those bytes weigh on the wire in a gzip image, independent of talaria's pack.
fn gzipped_reads(w: &Workload, trace: &StartupTrace) -> Result<u64> {
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut total = 0;
    for l in &w.layers {
        let Some(lt) = trace.layers.iter().find(|t| t.digest == l.digest) else {
            continue;
        };
        let wanted: BTreeMap<&str, &TracedFile> =
            lt.files.iter().map(|f| (f.path.as_str(), f)).collect();
        let mut gz = flate2::write::GzEncoder::new(Count(0), flate2::Compression::default());
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&l.blob[..]));
        for e in tar.entries().context("layer tar")? {
            let mut e = e.context("layer tar entry")?;
            let raw = e
                .path()
                .context("entry path")?
                .to_string_lossy()
                .into_owned();
            let path = raw.trim_start_matches("./").trim_start_matches('/');
            let Some(f) = wanted.get(path) else {
                continue;
            };
            let mut data = Vec::new();
            e.read_to_end(&mut data).context("entry data")?;
            for r in &f.ranges {
                let start = usize::try_from(r.offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = usize::try_from(r.offset.saturating_add(r.len))
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                gz.write_all(&data[start..end]).context("gzip")?;
            }
        }
        total += gz.finish().context("gzip")?.0;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------
// Statistics and report

fn mib(b: f64) -> f64 {
    b / f64::from(1 << 20)
}

fn fmt_mib(b: Option<f64>) -> String {
    b.map_or("n/a".to_string(), |b| format!("{:.1} MiB", mib(b)))
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"))
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Median over the runs of an optional counter; `None` if no run had it.
fn median_opt(samples: &[Sample], f: impl Fn(&NodeCounters) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = samples.iter().filter_map(|s| f(&s.node)).collect();
    (!v.is_empty()).then(|| median(&v))
}

/// What one invocation measured.
#[derive(Default)]
struct Results {
    samples: BTreeMap<Key, Vec<Sample>>,
    /// What the startup reads: a talaria-default run with --no-prefetch (one per workload).
    probes: BTreeMap<String, NodeCounters>,
    /// The recorded reads gzip-compressed, per workload (runs with a recorded variant).
    gzipped: BTreeMap<String, f64>,
    /// Seconds each tool took to make each variant's artifact, per workload.
    builds: BTreeMap<(String, Variant), f64>,
    /// Seconds of the recorded start, per workload (what recorded variants also needed).
    recording_secs: BTreeMap<String, f64>,
    /// PullImage times of the floor image, per link.
    floor: BTreeMap<String, Vec<f64>>,
    /// The app's own start time with the image local, per workload.
    local_start: BTreeMap<String, Vec<f64>>,
}

struct Report<'a> {
    args: &'a Args,
    workloads: &'a [Workload],
    r: &'a Results,
}

/// The physical limit of one workload on one link.
struct Limit {
    /// Startup bytes as they weigh on the wire, and which measure gave them.
    bytes: f64,
    source: &'static str,
    /// FUSE-read bytes times each layer's average compression ratio (the earlier measure).
    layer_ratio: Option<f64>,
    uncompressed: Option<f64>,
    local_start: f64,
    seconds: f64,
    /// Median PullImage time of the floor image on this link, and the limit with it in
    /// place of the 4 RTTs (when it is longer).
    floor: Option<f64>,
    with_floor: Option<f64>,
}

impl Report<'_> {
    fn cell(&self, w: &str, link: Link, v: Variant) -> Option<&Vec<Sample>> {
        self.r.samples.get(&(w.to_string(), link.to_string(), v))
    }

    fn ready_median(&self, w: &str, link: Link, v: Variant) -> Option<f64> {
        self.cell(w, link, v)
            .map(|s| median(&s.iter().map(|x| x.ready.as_secs_f64()).collect::<Vec<_>>()))
    }

    fn limit(&self, w: &Workload, link: Link) -> Option<Limit> {
        let probe = self.r.probes.get(&w.name)?;
        // FUSE-read bytes are what the app read; without that metric, the compressed bytes
        // fetched on demand (whole spans: an upper bound) stand in.
        // The recorded reads gzipped weigh what those bytes cost in a gzip image; the layer's
        // average ratio understates binaries and shared libraries, which compress worse.
        let (bytes, source) = match (
            self.r.gzipped.get(&w.name),
            probe.fuse_read_compressed,
            probe.on_demand,
        ) {
            (Some(b), _, _) => (*b, "recorded reads, gzipped"),
            (None, Some(b), _) => (b, "FUSE read x layer ratio"),
            (None, None, Some(b)) => (b, "on-demand spans (upper bound)"),
            (None, None, None) => return None,
        };
        let local_start = median(self.r.local_start.get(&w.name)?);
        let transfer = bytes * 8.0 / (f64::from(link.rate_mbit) * 1e6);
        let rtts = f64::from(LIMIT_RTTS) * f64::from(link.delay_ms) / 1000.0;
        let seconds = transfer + rtts + local_start;
        let floor = self
            .r
            .floor
            .get(&link.to_string())
            .filter(|v| !v.is_empty())
            .map(|v| median(v));
        let with_floor = floor.map(|f| transfer + f.max(rtts) + local_start);
        Some(Limit {
            bytes,
            source,
            layer_ratio: probe.fuse_read_compressed,
            uncompressed: probe.fuse_read,
            local_start,
            seconds,
            floor,
            with_floor,
        })
    }

    /// The artifact column: the tool's time, and the recorded start it needed.
    fn build_cell(&self, w: &str, v: Variant) -> String {
        let Some(b) = self.r.builds.get(&(w.to_string(), v)) else {
            return "-".into();
        };
        match self.r.recording_secs.get(w).filter(|_| v.recorded()) {
            Some(r) => format!("{b:.1} (+ {r:.1} recorded start)"),
            None => format!("{b:.1}"),
        }
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| workload | link | variant | runs | ready median (s) | p90 (s) | pull median (s) | \
             overlayfs / variant | variant / limit | artifact made in (s) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for w in self.workloads {
            for link in &self.args.links {
                let base = self.ready_median(&w.name, *link, Variant::Overlayfs);
                let limit = self.limit(w, *link).map(|l| l.seconds);
                for v in &self.args.variants {
                    let Some(s) = self.cell(&w.name, *link, *v) else {
                        continue;
                    };
                    let ready = sorted(s.iter().map(|x| x.ready.as_secs_f64()));
                    let pull: Vec<f64> = s.iter().map(|x| x.pull.as_secs_f64()).collect();
                    let m = median(&ready);
                    let _ = writeln!(
                        out,
                        "| {} | {link} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                        w.name,
                        v.name(),
                        s.len(),
                        m,
                        percentile(&ready, 90.0),
                        median(&pull),
                        base.map_or("-".into(), |b| format!("{:.2}x", b / m)),
                        limit.map_or("n/a".into(), |l| format!("{:.2}x", m / l)),
                        self.build_cell(&w.name, *v),
                    );
                }
            }
        }
        out
    }

    fn limits(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "physical limit = startup bytes (as gzip) / link rate + {LIMIT_RTTS} RTTs \
             (connect, manifest, config, one round of parallel ranged reads) + the app's own start \
             time with a local image; \"with floor\": containerd's own PullImage time of a \
             4-layer image of a few bytes in place of the RTTs\n"
        );
        let _ = writeln!(
            out,
            "| workload | link | startup bytes MiB (as gzip) | measured as | uncompressed MiB | \
             layer-ratio estimate MiB | image MiB (compressed / unpacked) | local start (s) | \
             limit (s) | containerd pull floor (s) | limit with floor (s) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for w in self.workloads {
            for link in &self.args.links {
                let Some(l) = self.limit(w, *link) else {
                    let _ = writeln!(
                        out,
                        "| {} | {link} | n/a | no probe | n/a | n/a | {:.0} / {:.0} | n/a | n/a | n/a | n/a |",
                        w.name,
                        mib(w.compressed_bytes() as f64),
                        mib(w.unpacked_bytes() as f64)
                    );
                    continue;
                };
                let _ = writeln!(
                    out,
                    "| {} | {link} | {:.1} | {} | {} | {} | {:.0} / {:.0} | {:.2} | {:.2} | {} | {} |",
                    w.name,
                    mib(l.bytes),
                    l.source,
                    l.uncompressed
                        .map_or("n/a".into(), |u| format!("{:.1}", mib(u))),
                    l.layer_ratio
                        .map_or("n/a".into(), |u| format!("{:.1}", mib(u))),
                    mib(w.compressed_bytes() as f64),
                    mib(w.unpacked_bytes() as f64),
                    l.local_start,
                    l.seconds,
                    fmt_opt(l.floor, 2),
                    fmt_opt(l.with_floor, 2),
                );
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| workload | link | variant | ready median (s) | variant / limit | variant / limit with floor |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for w in self.workloads {
            for link in &self.args.links {
                let Some(l) = self.limit(w, *link) else {
                    continue;
                };
                for v in &self.args.variants {
                    if !matches!(
                        v,
                        Variant::TalariaAccelerated
                            | Variant::TalariaRecorded
                            | Variant::TalariaRecordedProxy
                    ) {
                        continue;
                    }
                    let Some(m) = self.ready_median(&w.name, *link, *v) else {
                        continue;
                    };
                    let _ = writeln!(
                        out,
                        "| {} | {link} | {} | {m:.2} | {:.2}x | {} |",
                        w.name,
                        v.name(),
                        m / l.seconds,
                        l.with_floor
                            .map_or("n/a".into(), |f| format!("{:.2}x", m / f)),
                    );
                }
            }
        }
        out
    }

    fn where_time_goes(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "where the time goes (medians over runs; over the link = what the shaped registry sent \
             from PullImage to ready; node counters at ready; n/a = this node has no such metric)\n"
        );
        let _ = writeln!(
            out,
            "| workload | link | variant | pull (s) | start to ready (s) | over the link MiB | \
             on demand MiB | prefetched MiB | from cache MiB | FUSE read MiB | read waits | \
             read wait (s) | startup prefetch (s) | mount (s, sum) | fallbacks |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for w in self.workloads {
            for link in &self.args.links {
                for v in &self.args.variants {
                    let Some(s) = self.cell(&w.name, *link, *v) else {
                        continue;
                    };
                    let pull: Vec<f64> = s.iter().map(|x| x.pull.as_secs_f64()).collect();
                    let after: Vec<f64> = s
                        .iter()
                        .map(|x| x.ready.saturating_sub(x.pull).as_secs_f64())
                        .collect();
                    let m = |f: fn(&NodeCounters) -> Option<f64>| {
                        if v.uses_talaria() {
                            fmt_opt(median_opt(s, f).map(mib), 1)
                        } else {
                            "-".into()
                        }
                    };
                    let n = |f: fn(&NodeCounters) -> Option<f64>, d: usize| {
                        if v.uses_talaria() {
                            fmt_opt(median_opt(s, f), d)
                        } else {
                            "-".into()
                        }
                    };
                    let sent: Vec<f64> = s
                        .iter()
                        .filter_map(|x| x.link_bytes.map(|b| b as f64))
                        .collect();
                    let _ = writeln!(
                        out,
                        "| {} | {link} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        w.name,
                        v.name(),
                        median(&pull),
                        median(&after),
                        fmt_opt((!sent.is_empty()).then(|| mib(median(&sent))), 1),
                        m(|c| c.on_demand),
                        m(|c| c.prefetched),
                        m(|c| c.from_cache),
                        m(|c| c.fuse_read),
                        n(|c| c.read_waits, 0),
                        n(|c| c.read_wait_seconds, 2),
                        n(|c| c.startup_prefetch_seconds, 2),
                        n(|c| c.mount_seconds, 2),
                        n(|c| c.fallbacks, 0),
                    );
                }
            }
        }
        out
    }

    fn results_dir(&self) -> Result<PathBuf> {
        let dir = match &self.args.results_dir {
            Some(d) => d.clone(),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME unset")?)
                .join(".cache/talaria/bench-results"),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// The tables of the cells measured so far, in `startup-partial.md` of the results dir.
    fn write_partial(&self) -> Result<()> {
        let path = self.results_dir()?.join("startup-partial.md");
        let text = format!("{}\n{}", self.table(), self.where_time_goes());
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    fn write_json(&self, wall: Duration) -> Result<PathBuf> {
        let dir = self.results_dir()?;
        let counters_json = |c: &NodeCounters| {
            json!({
                "on_demand_bytes": c.on_demand,
                "prefetched_bytes": c.prefetched,
                "from_cache_bytes": c.from_cache,
                "fuse_read_bytes": c.fuse_read,
                "fuse_read_compressed_bytes": c.fuse_read_compressed,
                "read_waits": c.read_waits,
                "read_wait_seconds": c.read_wait_seconds,
                "startup_prefetch_seconds": c.startup_prefetch_seconds,
                "mount_seconds": c.mount_seconds,
                "fallbacks": c.fallbacks,
            })
        };
        let mut cells = Vec::new();
        for ((w, link, v), s) in &self.r.samples {
            cells.push(json!({
                "workload": w,
                "link": link,
                "variant": v.name(),
                "artifact_seconds": self.r.builds.get(&(w.clone(), *v)),
                "runs": s.iter().map(|x| json!({
                    "ready_seconds": x.ready.as_secs_f64(),
                    "pull_seconds": x.pull.as_secs_f64(),
                    "link_bytes": x.link_bytes,
                    "node": counters_json(&x.node),
                })).collect::<Vec<_>>(),
            }));
        }
        let mut limits = Vec::new();
        for w in self.workloads {
            for link in &self.args.links {
                if let Some(l) = self.limit(w, *link) {
                    limits.push(json!({
                        "workload": w.name,
                        "link": link.to_string(),
                        "startup_bytes_compressed": l.bytes,
                        "measured_as": l.source,
                        "startup_bytes_layer_ratio_estimate": l.layer_ratio,
                        "startup_bytes_uncompressed": l.uncompressed,
                        "rtts": LIMIT_RTTS,
                        "local_start_seconds": l.local_start,
                        "limit_seconds": l.seconds,
                        "containerd_pull_floor_seconds": l.floor,
                        "limit_with_floor_seconds": l.with_floor,
                    }));
                }
            }
        }
        let doc = json!({
            "benchmark": "startup",
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "wall_seconds": wall.as_secs_f64(),
            "runs": self.args.runs,
            "node_args": self.args.node_args,
            "fuse_holder": self.args.fuse_holder,
            "workloads": self.workloads.iter().map(|w| json!({
                "name": w.name,
                "layers": w.layers.iter().zip(&w.unpacked).map(|(l, u)| json!({
                    "digest": l.digest, "compressed": l.blob.len(), "unpacked": u,
                })).collect::<Vec<_>>(),
                "local_start_seconds": self.r.local_start.get(&w.name),
                "recorded_start_seconds": self.r.recording_secs.get(&w.name),
                "probe": self.r.probes.get(&w.name).map(counters_json),
            })).collect::<Vec<_>>(),
            "cells": cells,
            "limits": limits,
            "pull_floor_seconds": &self.r.floor,
        });
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = dir.join(format!("startup-{stamp}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}
