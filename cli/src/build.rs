//! `talaria build`: build (or adopt) the accelerated artifact of an image and print what
//! it holds.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use talaria_artifact::build::{self, BuildOptions, Recorded, Reuse};
use talaria_artifact::format::{Knobs, Profile};
use talaria_artifact::signature::{self, SigningKey};
use talaria_artifact::startup::StartupTrace;

use crate::GlobalArgs;
use crate::common::{CliResult, Output, human, open_stores, platform, short};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The image.
    pub image: String,
    /// `startup-local-v1` (indexes + startup plan) or `default` (indexes only).
    #[arg(long, value_enum, default_value_t = ProfileArg::StartupLocalV1)]
    pub profile: ProfileArg,
    /// Uncompressed bytes between decompression checkpoints (64 KiB to 64 MiB).
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(65536..=67108864))]
    pub span_size: u64,
    /// Most bytes of startup data a node prefetches first.
    #[arg(long, default_value_t = 256 << 20)]
    pub prefetch_budget: u64,
    /// Layers smaller than this many compressed bytes are not indexed (pulled normally); 0 indexes all.
    #[arg(long, default_value_t = 0)]
    pub skip_smaller_than: u64,
    /// Layers indexed at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub parallelism: u64,
    /// Plan the reads of a recorded start instead of predicting them: a talaria-node's
    /// `/startup-trace` (JSON). The artifact replaces an existing one of the same key.
    #[arg(long, value_name = "FILE")]
    pub startup_trace: Option<std::path::PathBuf>,
    /// With --startup-trace: re-index the layers the start read with spans of this size
    /// there (uniform elsewhere), for nodes that fetch spans; 0 (default) keeps the indexes,
    /// since the startup pack carries the bytes read.
    #[arg(long, default_value_t = 0)]
    pub hot_span_size: u64,
    /// With --startup-trace: no startup pack (nodes fetch the plan's spans instead).
    #[arg(long)]
    pub no_pack: bool,
    /// Sign the artifact with this ECDSA P-256 private key (PKCS#8 PEM, e.g. from `talaria
    /// keygen`), cosign-compatibly: nodes trusting its public key use the artifact.
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<std::path::PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileArg {
    #[value(name = "startup-local-v1")]
    StartupLocalV1,
    #[value(name = "default")]
    Default,
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

pub async fn run(g: &GlobalArgs, args: &BuildArgs) -> CliResult<()> {
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
                budget: Some(talaria_artifact::build::DEFAULT_RECORDED_BUDGET),
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
        // The user's own layout or repository: what is there is theirs to reuse.
        reuse: Reuse::AnyInStore,
    };
    // Read first: a bad key fails before any work.
    let sign_key = match &args.sign_key {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(anyhow::Error::from)
                .and_then(|t| SigningKey::from_pem(&t).map_err(Into::into))
                .with_context(|| format!("reading the signing key {}", p.display()))?,
        ),
        None => None,
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
    if let Some(key) = &sign_key {
        signature::sign(
            stores.artifacts.as_ref(),
            &stores.artifacts.name(),
            &s.artifact,
            key,
        )
        .await
        .with_context(|| format!("signing {}", s.artifact.digest))?;
    }

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
}
