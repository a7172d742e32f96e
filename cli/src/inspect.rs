//! `talaria inspect IMAGE`: platforms, layers, artifacts, and the one a node would use.

use anyhow::Context;
use serde_json::json;
use talaria_artifact::build::resolve_image;
use talaria_artifact::discover;
use talaria_artifact::format::ArtifactInfo;
use talaria_artifact::oci::Manifest;
use talaria_artifact::oci::store::Store;
use talaria_artifact::startup::plan::StartupPlan;

use crate::GlobalArgs;
use crate::common::{CliResult, Output, choose_artifact, human, open_stores, platform, short};

/// Largest startup plan blob read for display.
const MAX_PLAN: u64 = 64 << 20;

pub async fn run(g: &GlobalArgs, image: &str) -> CliResult<()> {
    let stores = open_stores(g, image, false)?;
    let store = stores.image.store.as_ref();
    let top = store
        .get_manifest(&stores.image.reference)
        .await
        .with_context(|| format!("reading the manifest of {image}"))?;
    let platforms: Vec<String> = match top.parse().context("parsing the image manifest")? {
        Manifest::Index(idx) => idx
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect(),
        Manifest::Image(_) => Vec::new(),
    };
    let plat = platform(g)?;
    let (raw, manifest) = resolve_image(store, &stores.image.reference, &plat)
        .await
        .with_context(|| format!("resolving {image} for {plat}"))?;
    let subject = raw.descriptor();
    let artifacts = discover::list_artifacts(stores.artifacts.as_ref(), &subject.digest)
        .await
        .with_context(|| format!("listing the artifacts of {}", subject.digest))?;
    let chosen = choose_artifact(g, stores.artifacts.as_ref(), &subject.digest)
        .await
        .with_context(|| format!("choosing the artifact of {}", subject.digest))?;
    let plan = match chosen.as_ref().and_then(|a| a.plan.as_ref()) {
        Some(d) => load_plan(stores.artifacts.as_ref(), &d.digest).await,
        None => None,
    };

    match g.output {
        Output::Json => {
            let arts: Vec<_> = artifacts.iter().map(artifact_json).collect();
            let out = json!({
                "image": image, "platforms": platforms, "platform": plat.to_string(),
                "manifest": {"digest": subject.digest, "size": subject.size, "mediaType": subject.media_type},
                "layers": manifest.layers.iter().map(|l| json!({"digest": l.digest, "size": l.size, "mediaType": l.media_type})).collect::<Vec<_>>(),
                "artifactStore": stores.artifacts.name(),
                "artifacts": arts,
                "nodeWouldUse": chosen.as_ref().map(|a| a.descriptor.digest.clone()),
                "plan": plan.as_ref().map(|p| json!({"files": p.entries.len(), "paths": p.paths, "prefetchBudget": p.prefetch_budget, "entries": p.entries,
                    "pack": p.pack.as_ref().map(|t| json!({"digest": t.digest, "size": t.size, "compression": t.compression, "bytes": t.bytes(), "chunks": t.chunks.len(), "files": t.files()}))})),
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Output::Text => {
            println!("image      {image}");
            if !platforms.is_empty() {
                println!("platforms  {}", platforms.join(", "));
            }
            println!("manifest   {} ({plat})", subject.digest);
            println!("layers     {}", manifest.layers.len());
            let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
            for (i, l) in manifest.layers.iter().enumerate() {
                println!(
                    "  {i:>3}  {}  {:>10}  {}",
                    short(&l.digest),
                    human(l.size),
                    l.media_type
                );
            }
            println!("           {} in all", human(total));
            println!(
                "artifacts  {} in {}",
                artifacts.len(),
                stores.artifacts.name()
            );
            for a in &artifacts {
                let mark = if chosen
                    .as_ref()
                    .is_some_and(|c| c.descriptor.digest == a.descriptor.digest)
                {
                    "*"
                } else {
                    " "
                };
                println!(
                    " {mark} {}  {:<16} v{}  key {}  {} indexes{}{}  created {}",
                    short(&a.descriptor.digest),
                    a.profile,
                    a.profile_version,
                    a.key,
                    a.layers.len(),
                    if a.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", {} skipped", a.skipped.len())
                    },
                    match (&a.plan, a.plan_recorded) {
                        (Some(_), true) => ", recorded plan",
                        (Some(_), false) => ", plan",
                        (None, _) => "",
                    },
                    a.created.as_deref().unwrap_or("-"),
                );
            }
            match &chosen {
                Some(a) => println!(
                    "node uses  {} ({})",
                    a.descriptor.digest,
                    if a.is_accelerated() {
                        "accelerated"
                    } else {
                        "default: indexes only"
                    }
                ),
                None => println!(
                    "node uses  none: layers are pulled normally (run `talaria build {image}`)"
                ),
            }
            if let Some(p) = &plan {
                print_plan(p);
            }
        }
    }
    Ok(())
}

/// Plan entries listed in text output (JSON lists them all).
const PLAN_LINES: usize = 50;

fn print_plan(p: &StartupPlan) {
    let bytes: u64 = p.entries.iter().map(|e| e.bytes).sum();
    let spans: usize = p.entries.iter().map(|e| e.spans.len()).sum();
    println!(
        "plan       {} files, {}, {spans} spans, {} path patterns, prefetch budget {}",
        p.entries.len(),
        human(bytes),
        p.paths.len(),
        human(p.prefetch_budget)
    );
    if let Some(t) = &p.pack {
        println!(
            "pack       {} of recorded reads ({} compressed) in {} chunks",
            human(t.bytes()),
            human(t.size),
            t.chunks.len()
        );
    }
    for e in p.entries.iter().take(PLAN_LINES) {
        let why = if e.reason.is_empty() { "-" } else { &e.reason };
        println!(
            "  p{} L{:<2} {:>4} spans {:>10}  {}  ({why})",
            e.priority,
            e.layer,
            e.spans.len(),
            human(e.bytes),
            e.path
        );
    }
    if p.entries.len() > PLAN_LINES {
        println!(
            "  ... {} more (--output json lists all)",
            p.entries.len() - PLAN_LINES
        );
    }
}

async fn load_plan(store: &dyn Store, digest: &str) -> Option<StartupPlan> {
    let bytes = match store.get_blob(digest, MAX_PLAN).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%digest, error = %e, "startup plan unreadable");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(%digest, error = %e, "startup plan does not parse"))
        .ok()
}

fn artifact_json(a: &ArtifactInfo) -> serde_json::Value {
    json!({
        "digest": a.descriptor.digest, "size": a.descriptor.size, "profile": a.profile,
        "profileVersion": a.profile_version, "key": a.key, "created": a.created,
        "planRecorded": a.plan_recorded, "pack": a.pack.as_ref().map(|d| d.digest.clone()),
        "indexes": a.layers.iter().map(|l| json!({"layer": l.layer_digest, "index": l.index.digest, "size": l.index.size,
            "windows": l.windows.as_ref().map(|w| json!({"digest": w.digest, "size": w.size}))})).collect::<Vec<_>>(),
        "skipped": a.skipped, "plan": a.plan.as_ref().map(|d| d.digest.clone()),
        "startupPaths": a.startup_paths, "accelerated": a.is_accelerated(),
    })
}
