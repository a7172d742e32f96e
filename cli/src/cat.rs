//! `talaria cat IMAGE PATH`: a file of the image, read lazily through the artifact.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use talaria_artifact::build::resolve_image;
use talaria_artifact::discover;
use talaria_artifact::index::reader::MemorySpanCache;
use talaria_artifact::index::{Entry, EntryKind, LayerIndex};
use talaria_artifact::view::MergedView;

use crate::GlobalArgs;
use crate::common::{
    CliError, CliResult, EXIT_NO_ARTIFACT, EXIT_NOT_FOUND, choose_artifact, human, open_stores,
    platform,
};

/// Symlinks followed while resolving one path (as Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;
/// Bytes read and written per step.
const CHUNK: u64 = 1 << 20;

pub async fn run(g: &GlobalArgs, image: &str, path: &str) -> CliResult<()> {
    let stores = open_stores(g, image, false)?;
    let plat = platform(g)?;
    let (raw, manifest) =
        resolve_image(stores.image.store.as_ref(), &stores.image.reference, &plat)
            .await
            .with_context(|| format!("resolving {image} for {plat}"))?;
    let subject = raw.descriptor();
    let Some(art) = choose_artifact(g, stores.artifacts.as_ref(), &subject.digest)
        .await
        .with_context(|| format!("finding the artifact of {}", subject.digest))?
    else {
        let signed = if g.keys.is_empty() {
            ""
        } else {
            " signed by --key"
        };
        return Err(CliError::new(
            EXIT_NO_ARTIFACT,
            anyhow!(
                "{image} ({}) has no Talaria artifact{signed} in {}; run `talaria build {image}`",
                subject.digest,
                stores.artifacts.name()
            ),
        ));
    };

    let mut indexes: Vec<Option<Arc<LayerIndex>>> = Vec::with_capacity(manifest.layers.len());
    for l in &manifest.layers {
        indexes.push(match art.index_for(&l.digest) {
            Some(d) => Some(Arc::new(
                discover::load_index(stores.artifacts.as_ref(), d)
                    .await
                    .with_context(|| format!("loading the index of layer {}", l.digest))?,
            )),
            None => None,
        });
    }
    let refs: Vec<Option<&LayerIndex>> = indexes.iter().map(|i| i.as_deref()).collect();
    let view = MergedView::new(&refs);
    let (layer_no, entry) = resolve_path(&view, path).map_err(|e| {
        let skipped = indexes.iter().filter(|i| i.is_none()).count();
        let e = if skipped > 0 {
            e.context(format!(
                "{skipped} layer(s) are not indexed and not searched"
            ))
        } else {
            e
        };
        CliError::new(EXIT_NOT_FOUND, e)
    })?;
    if entry.kind != EntryKind::File {
        return Err(anyhow!("{path} is not a regular file ({:?})", entry.kind).into());
    }
    let (Some(index), Some(layer)) = (
        indexes.get(layer_no).cloned().flatten(),
        manifest.layers.get(layer_no),
    ) else {
        return Err(anyhow!("internal: layer {layer_no} of {path} has no index").into());
    };
    let source = stores
        .image
        .store
        .range_source(layer)
        .with_context(|| format!("opening layer {}", layer.digest))?;
    let reader = discover::layer_reader(
        index,
        source,
        stores.artifacts.as_ref(),
        Arc::new(MemorySpanCache::new(64 << 20)),
    )
    .context("opening the index's windows blob")?;
    let mut out = std::io::stdout().lock();
    let mut off = 0;
    while off < entry.size {
        let n = CHUNK.min(entry.size - off);
        let bytes = reader
            .read_file(&entry, off, n)
            .await
            .with_context(|| format!("reading {path} at {off} from layer {}", layer.digest))?;
        if bytes.is_empty() {
            return Err(anyhow!("reading {path}: no bytes at offset {off}").into());
        }
        out.write_all(&bytes).context("writing to stdout")?;
        off += bytes.len() as u64;
    }
    out.flush().context("writing to stdout")?;
    let stats = reader.stats();
    let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
    eprintln!(
        "talaria: {path}: {} from layer {layer_no} ({}); fetched {} compressed in {} span(s) = {:.2}% of the image's {} of layers",
        human(entry.size),
        crate::common::short(&layer.digest),
        human(stats.compressed_bytes_fetched),
        stats.spans_fetched,
        if total == 0 {
            0.0
        } else {
            100.0 * stats.compressed_bytes_fetched as f64 / total as f64
        },
        human(total),
    );
    Ok(())
}

/// Resolves `path` in the merged view, following symlinks (in any component) within the
/// image root: `..` stops at the root and absolute targets restart from it, as in a chroot.
fn resolve_path(view: &MergedView, path: &str) -> anyhow::Result<(usize, Entry)> {
    let mut pending: Vec<String> = components(path).rev().collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let p = cur.join("/");
        let Some((_, e)) = view.lookup(&p) else {
            return Err(anyhow!("{path}: no such file in the image (at /{p})"));
        };
        if e.kind == EntryKind::Symlink {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(anyhow!("{path}: too many levels of symbolic links"));
            }
            let target = e.link_target.clone().unwrap_or_default();
            cur.pop();
            if target.starts_with('/') {
                cur.clear();
            }
            pending.extend(components(&target).rev());
        }
    }
    let p = cur.join("/");
    view.lookup(&p)
        .map(|(l, e)| (l, e.clone()))
        .ok_or_else(|| anyhow!("{path}: no such file in the image"))
}

fn components(p: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
}
