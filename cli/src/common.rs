//! What the commands share: error → exit code, opening stores, the build command.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use serde_json::json;
use talaria_artifact::build::{self, BuildError, BuildOptions, Recorded};
use talaria_artifact::format::{Knobs, Profile};
use talaria_artifact::oci::Platform;
use talaria_artifact::oci::registry::credentials::Credentials;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig};
use talaria_artifact::oci::store::{OpenedRef, Store, open_reference};
use talaria_artifact::startup::StartupTrace;

use crate::{BuildArgs, GlobalArgs, ProfileArg};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Exit codes scripts can rely on.
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_NO_ARTIFACT: u8 = 4;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub error: anyhow::Error,
    pub code: u8,
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        self.code
    }
    pub fn new(code: u8, error: anyhow::Error) -> Self {
        CliError { error, code }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        // A missing manifest or blob anywhere in the chain means "not found".
        let not_found = error.chain().any(|c| {
            c.downcast_ref::<talaria_artifact::oci::store::StoreError>()
                .is_some_and(|e| e.is_not_found())
                || c.downcast_ref::<BuildError>()
                    .is_some_and(|e| matches!(e, BuildError::Store(s) if s.is_not_found()))
        });
        let code = if not_found {
            EXIT_NOT_FOUND
        } else {
            EXIT_ERROR
        };
        CliError { error, code }
    }
}

pub type CliResult<T> = Result<T, CliError>;

pub fn registry_client(g: &GlobalArgs) -> anyhow::Result<RegistryClient> {
    let mut cfg = RegistryConfig {
        insecure_hosts: g.insecure.clone(),
        ..RegistryConfig::default()
    };
    let path = g.docker_config.clone().or_else(|| {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker"))
            })?;
        Some(dir.join("config.json"))
    });
    if let Some(p) = path {
        // An explicitly named file must exist; the default one may not.
        if g.docker_config.is_some() || p.exists() {
            cfg.credentials = Credentials::from_docker_config_file(&p)
                .with_context(|| format!("reading registry credentials from {}", p.display()))?;
        }
    }
    RegistryClient::new(cfg).context("creating the registry client")
}

pub fn platform(g: &GlobalArgs) -> anyhow::Result<Platform> {
    match &g.platform {
        None => Ok(Platform::host()),
        Some(s) => Platform::parse(s)
            .with_context(|| format!("invalid platform {s:?}: expected os/arch[/variant]")),
    }
}

/// The image's store and reference, and the store artifacts live in.
pub struct Stores {
    pub image: OpenedRef,
    pub artifacts: Arc<dyn Store>,
}

pub fn open_stores(
    g: &GlobalArgs,
    image: &str,
    create_artifact_repo: bool,
) -> anyhow::Result<Stores> {
    let client = registry_client(g)?;
    let opened =
        open_reference(image, &client, false).with_context(|| format!("opening image {image}"))?;
    let artifacts = match &g.artifact_repo {
        None => opened.store.clone(),
        Some(repo) => {
            // A repository reference needs a tag to parse; it is not used.
            let r = if repo.starts_with("oci:") {
                repo.clone()
            } else {
                format!("{repo}:artifacts")
            };
            open_reference(&r, &client, create_artifact_repo)
                .with_context(|| format!("opening artifact repository {repo}"))?
                .store
        }
    };
    Ok(Stores {
        image: opened,
        artifacts,
    })
}

/// A spinner on stderr while long work runs, when stderr is a terminal.
pub fn spinner(msg: String) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    Some(pb)
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// Largest startup trace file read.
const MAX_TRACE_FILE: u64 = 256 << 20;

fn read_trace(path: &std::path::Path) -> anyhow::Result<StartupTrace> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .with_context(|| format!("opening the startup trace {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_TRACE_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the startup trace {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_TRACE_FILE,
        "startup trace {} is larger than {} MiB",
        path.display(),
        MAX_TRACE_FILE >> 20
    );
    StartupTrace::from_json(&bytes).with_context(|| format!("startup trace {}", path.display()))
}

pub async fn build(g: &GlobalArgs, args: &BuildArgs) -> CliResult<()> {
    let recorded = match &args.startup_trace {
        Some(p) => {
            if args.profile == ProfileArg::Default {
                return Err(anyhow::anyhow!(
                    "--startup-trace needs a profile with a startup plan, not `default`"
                )
                .into());
            }
            Some(Arc::new(Recorded {
                trace: read_trace(p)?,
                hot_span_size: args.hot_span_size,
                pack: !args.no_pack,
            }))
        }
        None => None,
    };
    let stores = open_stores(g, &args.image, true)?;
    let opts = BuildOptions {
        platform: platform(g)?,
        profile: match args.profile {
            ProfileArg::StartupLocalV1 => Profile::StartupLocalV1,
            ProfileArg::Default => Profile::Default,
        },
        knobs: Knobs {
            span_size: args.span_size,
            prefetch_budget: args.prefetch_budget,
            skip_threshold: args.skip_smaller_than,
        },
        parallelism: args.parallelism as usize,
        created: Some(now_rfc3339()),
        recorded,
    };
    let pb = spinner(format!("indexing the layers of {}", args.image));
    let artifact_store = g.artifact_repo.as_ref().map(|_| stores.artifacts.clone());
    let res = build::build(
        stores.image.store.clone(),
        &stores.image.reference,
        artifact_store,
        &opts,
    )
    .await;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let s = res.with_context(|| format!("building the artifact of {}", args.image))?;

    match g.output {
        Output::Json => {
            let layers: Vec<_> = s
                .layers
                .iter()
                .map(|l| {
                    json!({
                        "digest": l.digest, "compressedSize": l.compressed_size,
                        "uncompressedSize": l.uncompressed_size,
                        "index": l.index.as_ref().map(|d| json!({"digest": d.digest, "size": d.size})),
                        "entries": l.entries, "spans": l.spans, "skipped": l.skipped,
                        "seconds": l.duration.as_secs_f64(),
                    })
                })
                .collect();
            let out = json!({
                "image": {"digest": s.image.digest, "size": s.image.size},
                "artifact": {"digest": s.artifact.digest, "size": s.artifact.size,
                             "store": stores.artifacts.name()},
                "key": s.key, "adopted": s.adopted,
                "plan": s.plan.as_ref().map(|d| json!({"digest": d.digest, "size": d.size})),
                "layers": layers, "seconds": s.duration.as_secs_f64(),
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Output::Text => {
            println!("image     {} ({})", s.image.digest, args.image);
            if s.adopted {
                println!(
                    "artifact  {} (already existed for this key; adopted, nothing built)",
                    s.artifact.digest
                );
            } else {
                println!(
                    "artifact  {} in {}",
                    s.artifact.digest,
                    stores.artifacts.name()
                );
            }
            println!("key       {}", s.key);
            if !s.adopted {
                println!(
                    "{:<14} {:>10} {:>11} {:>10} {:>8} {:>7} {:>7}",
                    "LAYER", "GZIP", "TAR", "INDEX", "FILES", "SPANS", "SECS"
                );
                let (mut gz, mut idx) = (0u64, 0u64);
                for l in &s.layers {
                    gz += l.compressed_size;
                    match (&l.index, &l.skipped) {
                        (Some(d), _) => {
                            idx += d.size;
                            println!(
                                "{:<14} {:>10} {:>11} {:>10} {:>8} {:>7} {:>7.2}",
                                short(&l.digest),
                                human(l.compressed_size),
                                human(l.uncompressed_size),
                                human(d.size),
                                l.entries,
                                l.spans,
                                l.duration.as_secs_f64()
                            );
                        }
                        (None, why) => println!(
                            "{:<14} {:>10} skipped: {}",
                            short(&l.digest),
                            human(l.compressed_size),
                            why.as_deref().unwrap_or("not indexed")
                        ),
                    }
                }
                let pct = if gz == 0 {
                    0.0
                } else {
                    100.0 * idx as f64 / gz as f64
                };
                println!(
                    "indexes   {} for {} of layers ({pct:.2}%), in {:.2}s",
                    human(idx),
                    human(gz),
                    s.duration.as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

/// RFC 3339 UTC timestamp without a date library: the artifact's `created` annotation
/// orders artifacts newest first.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_well_formed() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(10), "10 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
