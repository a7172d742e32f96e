//! Cold start through CRI: time from PullImage to the container's first stdout line, for an
//! image of over 1 GiB behind a shaped registry link, with containerd's overlayfs snapshotter
//! and with talaria-node (no artifact, default artifact, accelerated artifact).
//!
//! Every run starts from nothing: a fresh containerd (empty content store) and, for talaria, a
//! fresh talaria-node root (empty span cache). Variants are interleaved run by run so a drift
//! of the machine hits them all alike. Printed: per-variant median and p90 of time to first
//! output, the pull's share of it, and the speedup against overlayfs.
//!
//! `hack/bench-cold-start.sh [--rate-mbit 200] [--delay-ms 20] [--runs 3] ...` (root: netns,
//! tc, FUSE, containerd). The image's layer blobs are generated deterministically once and
//! cached under `~/.cache/talaria/bench-cold-start/`.
//!
//! Setup trick: images and artifacts are pushed and built against an unshaped loopback
//! registry, whose storage is then hard-linked into the shaped registry's (both are
//! distribution's filesystem driver), so setting up does not wait on the shaped link.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use common::{NodeProc, http_get, link_storage, median, percentile};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::format::Profile;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_testenv::cri::{self, Cri, CriContainerd, CriOptions, CriSnapshotter};
use talaria_testenv::images::{self, Image, ImageBuilder, Layer, LayerBuilder};
use talaria_testenv::registry::Registry;

const REPO: &str = "talaria/cold-start";
const SNAPSHOTTER: &str = "talaria";
/// How often the container's log is checked for its first line.
const POLL: Duration = Duration::from_millis(5);
/// The small file the `read` workload prints: in the last big layer, after its big file.
const READY_FILE: &str = "app/ready.txt";

#[derive(Parser, Debug)]
#[command(about = "Cold-start benchmark: PullImage to first output, overlayfs vs talaria")]
struct Args {
    /// Link rate between node and registry, Mbit/s (each direction).
    #[arg(long, default_value_t = 200)]
    rate_mbit: u32,
    /// Round-trip delay added on the link, ms.
    #[arg(long, default_value_t = 20)]
    delay_ms: u32,
    /// Runs per variant.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Comma-separated: overlayfs, talaria-none, talaria-default, talaria-accelerated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overlayfs,talaria-none,talaria-default,talaria-accelerated"
    )]
    variants: Vec<Variant>,
    /// Big layers on top of busybox, each one file of incompressible bytes.
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Size of each big layer's file, MiB.
    #[arg(long, default_value_t = 350)]
    layer_mib: usize,
    /// `echo`: the container runs `echo ready`; `read`: it prints a small file stored after
    /// the big file of the last big layer.
    #[arg(long, value_enum, default_value_t = Workload::Echo)]
    workload: Workload,
    /// Extra talaria-node flags (e.g. "--no-prefetch"), whitespace-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    node_args: String,
    /// Keep each run's talaria-node and containerd logs here (`RUN-VARIANT-*.log`).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Passed by `cargo bench` to harness-less benches; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Echo,
    Read,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Variant {
    Overlayfs,
    TalariaNone,
    TalariaDefault,
    TalariaAccelerated,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Overlayfs => "overlayfs",
            Variant::TalariaNone => "talaria-none",
            Variant::TalariaDefault => "talaria-default",
            Variant::TalariaAccelerated => "talaria-accelerated",
        }
    }

    /// The tag it pulls: one image per artifact kind (they differ only in config, so they
    /// share every layer blob), overlayfs pulls the one without an artifact.
    fn tag(self) -> &'static str {
        match self {
            Variant::Overlayfs | Variant::TalariaNone => "none",
            Variant::TalariaDefault => "default",
            Variant::TalariaAccelerated => "accelerated",
        }
    }

    fn profile(self) -> Option<Profile> {
        match self {
            Variant::Overlayfs | Variant::TalariaNone => None,
            Variant::TalariaDefault => Some(Profile::Default),
            Variant::TalariaAccelerated => Some(Profile::StartupLocalV1),
        }
    }

    fn uses_talaria(self) -> bool {
        self != Variant::Overlayfs
    }
}

/// One measured cold start.
#[derive(Clone, Debug)]
struct Sample {
    /// PullImage call.
    pull: Duration,
    /// PullImage start to the first stdout line in the container's log.
    first_output: Duration,
    /// talaria-node counters at first output (zero for overlayfs).
    on_demand_bytes: f64,
    prefetched_bytes: f64,
    fallbacks: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.layers > 0, "--layers must be at least 1");
    ensure!(!args.variants.is_empty(), "no --variants");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    talaria_artifact::oci::registry::install_crypto_provider();
    let t_setup = Instant::now();
    let layers = cached_layers(args.layers, args.layer_mib)?;
    let image_bytes: usize = layers.iter().map(|l| l.blob.len()).sum();
    eprintln!(
        "layers ready: {} blobs, {:.2} GiB compressed ({:?})",
        layers.len(),
        image_bytes as f64 / f64::from(1 << 30),
        t_setup.elapsed()
    );

    let shaped = Registry::start_shaped(args.rate_mbit, args.delay_ms)
        .context("start the shaped registry")?;
    let host = shaped.host();
    {
        let local = Registry::start().context("start the loopback registry")?;
        push_images(&local, layers, &args).await?;
        link_storage(&local.storage_dir(), &shaped.storage_dir())?;
        // `local` dropped: its storage goes, the shaped registry keeps the hard links.
    }
    eprintln!(
        "registry {host} ready ({} Mbit/s, {} ms) after {:?}",
        args.rate_mbit,
        args.delay_ms,
        t_setup.elapsed()
    );

    let mut samples: Vec<(Variant, Vec<Sample>)> =
        args.variants.iter().map(|v| (*v, Vec::new())).collect();
    let node_args: Vec<String> = args
        .node_args
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // Enough for the whole image over the link three times, and never under 10 minutes.
    let pull_timeout = Duration::from_secs(
        ((image_bytes as u64 * 8 * 3) / (u64::from(args.rate_mbit.max(1)) * 1_000_000)).max(600),
    );
    for run in 0..args.runs {
        for (variant, got) in &mut samples {
            let t = Instant::now();
            let s = cold_start(*variant, run, &host, &args, &node_args, pull_timeout)
                .await
                .with_context(|| format!("run {run} of {}", variant.name()))?;
            eprintln!(
                "run {run} {:<20} first output {:>8.2} s (pull {:>7.2} s; on demand {:.1} MiB, \
                 prefetched {:.1} MiB, fallbacks {}) [run took {:.1} s]",
                variant.name(),
                s.first_output.as_secs_f64(),
                s.pull.as_secs_f64(),
                s.on_demand_bytes / f64::from(1 << 20),
                s.prefetched_bytes / f64::from(1 << 20),
                s.fallbacks,
                t.elapsed().as_secs_f64()
            );
            got.push(s);
        }
    }
    println!(
        "\ncold start, {:.2} GiB image ({} x {} MiB + busybox), {} Mbit/s, {} ms RTT, workload {:?}, \
         {} runs each\n",
        image_bytes as f64 / f64::from(1 << 30),
        args.layers,
        args.layer_mib,
        args.rate_mbit,
        args.delay_ms,
        args.workload,
        args.runs
    );
    print!("{}", table(&samples));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One run

async fn cold_start(
    variant: Variant,
    run: usize,
    host: &str,
    args: &Args,
    node_args: &[String],
    pull_timeout: Duration,
) -> Result<Sample> {
    let dir = tempfile::Builder::new()
        .prefix("tlr-bench-cold-")
        .tempdir()
        .context("tempdir")?;
    let metrics_addr = format!("127.0.0.1:{}", talaria_testenv::free_port()?);
    let node = if variant.uses_talaria() {
        let mut a = vec![
            "--insecure-registry".to_string(),
            host.to_string(),
            "--metrics-addr".to_string(),
            metrics_addr.clone(),
        ];
        a.extend_from_slice(node_args);
        Some(NodeProc::start(
            Path::new(env!("CARGO_BIN_EXE_talaria-node")),
            dir.path(),
            &a,
        )?)
    } else {
        None
    };
    let snapshotter = match &node {
        Some(n) => CriSnapshotter::Proxy {
            name: SNAPSHOTTER.into(),
            socket: n.socket.clone(),
        },
        None => CriSnapshotter::Overlayfs,
    };
    let env = CriContainerd::start(CriOptions {
        snapshotter,
        ..CriOptions::default()
    })
    .context("start containerd with CRI")?;
    env.allow_plain_http(host)?;
    let cri = env
        .client()
        .await?
        .with_timeouts(Duration::from_secs(120), pull_timeout);
    // The sandbox exists before the pull, as kubelet creates it first.
    let pod = cri.run_pod("cold").await.context("RunPodSandbox")?;
    let image = format!("{host}/{REPO}:{}", variant.tag());
    let ready_cmd = format!("cat /{READY_FILE}");
    let command: Vec<&str> = match args.workload {
        Workload::Echo => vec!["echo", "ready"],
        Workload::Read => vec!["sh", "-c", &ready_cmd],
    };
    let name = "first";
    let log = pod.log_dir.join(format!("{name}.log"));

    let t0 = Instant::now();
    cri.pull_image(&image).await.context("PullImage")?;
    let pull = t0.elapsed();
    let id = cri
        .create_container(&pod, Cri::container_config(name, &image, &command))
        .await
        .context("CreateContainer")?;
    cri.start_container_id(&id)
        .await
        .context("StartContainer")?;
    let first_output = loop {
        if log.exists() {
            let (stdout, stderr) = cri::read_container_log(&log)?;
            if stdout.contains('\n') {
                ensure!(
                    stdout == "ready\n",
                    "unexpected output {stdout:?} {stderr:?}"
                );
                break t0.elapsed();
            }
        }
        if t0.elapsed() > pull_timeout * 2 {
            let (status, _) = cri.container_status(&id, false).await?;
            bail!(
                "no output within {:?}: state {} reason {:?} exit {}",
                pull_timeout * 2,
                status.state,
                status.reason,
                status.exit_code
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let metrics = if node.is_some() {
        http_get(&metrics_addr, "/metrics").context("scrape talaria-node metrics")?
    } else {
        String::new()
    };
    let _ = cri.remove_pod(&pod).await;
    if let Some(keep) = &args.keep_logs {
        std::fs::create_dir_all(keep).with_context(|| format!("create {}", keep.display()))?;
        let prefix = keep.join(format!("{run}-{}", variant.name()));
        let _ = std::fs::copy(
            env.containerd().log_path(),
            prefix.with_extension("containerd.log"),
        );
        if let Some(n) = &node {
            let _ = std::fs::copy(&n.log, prefix.with_extension("node.log"));
        }
    }
    drop(env);
    drop(node);
    Ok(Sample {
        pull,
        first_output,
        on_demand_bytes: metric_sum(&metrics, "talaria_node_fetched_on_demand_bytes"),
        prefetched_bytes: metric_sum(&metrics, "talaria_node_prefetched_bytes"),
        fallbacks: metric_sum(&metrics, "talaria_node_fallbacks"),
    })
}

/// Sum over all label sets of the metric whose lines start with `prefix`.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // A fold from +0.0: an empty f64 `sum` is -0.0.
        .fold(0.0, |a, b| a + b)
}

// ---------------------------------------------------------------------------------------
// Image, registry, artifacts

/// Big layer `i` of `n`: one file of noise; the last also holds the small READY_FILE after it.
fn big_layer(i: usize, n: usize, mib: usize) -> Result<Layer> {
    let mut b = LayerBuilder::new().dir("data", 0o755).file(
        &format!("data/blob-{i}.bin"),
        images::noise(i as u64 + 1, mib << 20),
        0o644,
    );
    if i + 1 == n {
        b = b.dir("app", 0o755).file(READY_FILE, "ready\n", 0o644);
    }
    Ok(b.build()?)
}

/// busybox + `n` big layers, generated once and cached as blob files (with their diff ids)
/// under ~/.cache/talaria/bench-cold-start/; digests are checked on load.
fn cached_layers(n: usize, mib: usize) -> Result<Vec<Layer>> {
    let home = std::env::var_os("HOME").context("HOME unset")?;
    let dir = PathBuf::from(home)
        .join(".cache/talaria/bench-cold-start")
        .join(format!("v1-{n}x{mib}"));
    let meta_path = dir.join("layers.json");
    let mut layers = vec![images::busybox_layer()?];
    if let Ok(text) = std::fs::read_to_string(&meta_path) {
        let meta: Vec<(String, String)> = serde_json::from_str(&text)?;
        let mut ok = meta.len() == n;
        for (digest, diff_id) in meta.iter().take(n) {
            let blob =
                std::fs::read(dir.join(digest.trim_start_matches("sha256:"))).unwrap_or_default();
            if images::sha256_digest(&blob) != *digest {
                ok = false;
                break;
            }
            layers.push(Layer {
                blob,
                digest: digest.clone(),
                diff_id: diff_id.clone(),
            });
        }
        if ok {
            return Ok(layers);
        }
        layers.truncate(1);
    }
    eprintln!("generating {n} layers of {mib} MiB into {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Two at a time: gzip of incompressible bytes is the slow part, and there are 2 cores.
    let mut built: Vec<Option<Layer>> = (0..n).map(|_| None).collect();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2) {
        let results: Vec<(usize, Result<Layer>)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&i| (i, s.spawn(move || big_layer(i, n, mib))))
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| {
                    let r = h
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("layer thread panicked")));
                    (i, r)
                })
                .collect()
        });
        for (i, r) in results {
            let layer = r?;
            let path = dir.join(layer.digest.trim_start_matches("sha256:"));
            std::fs::write(&path, &layer.blob)
                .with_context(|| format!("write {}", path.display()))?;
            if let Some(slot) = built.get_mut(i) {
                *slot = Some(layer);
            }
        }
    }
    let built: Vec<Layer> = built.into_iter().flatten().collect();
    ensure!(built.len() == n, "generated {} of {n} layers", built.len());
    let meta: Vec<(String, String)> = built
        .iter()
        .map(|l| (l.digest.clone(), l.diff_id.clone()))
        .collect();
    std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;
    layers.extend(built);
    Ok(layers)
}

/// Pushes one image per tag (same layers, configs differing by an env var) to `registry` and
/// builds each tag's artifact there.
async fn push_images(registry: &Registry, mut layers: Vec<Layer>, args: &Args) -> Result<()> {
    let host = registry.host();
    let mut tags: Vec<(&str, Option<Profile>)> = Vec::new();
    for v in &args.variants {
        if !tags.iter().any(|(t, _)| *t == v.tag()) {
            tags.push((v.tag(), v.profile()));
        }
    }
    for (tag, profile) in tags {
        let mut b = ImageBuilder::new()
            .env("PATH=/bin:/usr/bin:/sbin:/usr/sbin")
            .env(&format!("BENCH_IMAGE={tag}"))
            .cmd(&["/bin/sh"]);
        for l in layers {
            b = b.layer(l);
        }
        let image: Image = b.build()?;
        let t = Instant::now();
        image
            .push(&host, REPO, tag)
            .with_context(|| format!("push {REPO}:{tag}"))?;
        if let Some(p) = profile {
            build_artifact(&host, tag, p).await?;
        }
        eprintln!(
            "{REPO}:{tag} pushed (artifact {profile:?}) in {:?}",
            t.elapsed()
        );
        layers = image.layers;
    }
    Ok(())
}

async fn build_artifact(host: &str, tag: &str, profile: Profile) -> Result<()> {
    let client = RegistryClient::new(RegistryConfig {
        insecure_hosts: vec![host.to_string()],
        ..RegistryConfig::default()
    })?;
    let store: Arc<dyn Store> = Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: host.to_string(),
            name: REPO.to_string(),
        },
    ));
    let opts = BuildOptions {
        profile,
        ..BuildOptions::default()
    };
    let summary = build(store, tag, None, &opts)
        .await
        .with_context(|| format!("build the {} artifact of {tag}", profile.name()))?;
    ensure!(
        summary.layers.iter().all(|l| l.index.is_some()),
        "a layer was not indexed: {:?}",
        summary.layers
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Statistics

fn sorted_secs(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> Vec<f64> {
    let mut v: Vec<f64> = samples.iter().map(|s| f(s).as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// A markdown table: first output median/p90/min/max, pull median, MiB fetched before the
/// first output, and the speedup of the median against overlayfs.
fn table(samples: &[(Variant, Vec<Sample>)]) -> String {
    let base = samples
        .iter()
        .find(|(v, _)| *v == Variant::Overlayfs)
        .map(|(_, s)| median(&sorted_secs(s, |x| x.first_output)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| variant | runs | first output median (s) | p90 (s) | min (s) | max (s) | pull median (s) | \
         on-demand MiB | prefetched MiB | overlayfs / variant |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (v, s) in samples {
        let first = sorted_secs(s, |x| x.first_output);
        let pull = sorted_secs(s, |x| x.pull);
        let mib = |f: fn(&Sample) -> f64| {
            if !v.uses_talaria() {
                return "-".to_string();
            }
            let mut vals: Vec<f64> = s.iter().map(|x| f(x) / f64::from(1 << 20)).collect();
            vals.sort_by(f64::total_cmp);
            format!("{:.1}", median(&vals))
        };
        let m = median(&first);
        let ratio = base.map_or("-".to_string(), |b| format!("{:.2}x", b / m));
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            v.name(),
            s.len(),
            m,
            percentile(&first, 90.0),
            first.first().copied().unwrap_or(f64::NAN),
            first.last().copied().unwrap_or(f64::NAN),
            median(&pull),
            mib(|x| x.on_demand_bytes),
            mib(|x| x.prefetched_bytes),
            ratio
        );
    }
    out
}
