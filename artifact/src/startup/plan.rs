//! From the analysis to the startup plan: each file's byte ranges become spans of the
//! layer that holds it in the merged view, in expected access order, with the file class
//! as priority, within the prefetch budget.

use std::collections::{BTreeMap, HashSet};

use super::Analysis;
use crate::index::LayerIndex;
use serde::{Deserialize, Serialize};

/// The startup plan blob (`startup-local-v1`). Until startup-path discovery lands the
/// entries are empty, but the document is complete and versioned.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupPlan {
    pub version: u32,
    pub profile: String,
    pub prefetch_budget: u64,
    /// Normalized startup path patterns.
    pub paths: Vec<String>,
    /// Files to fetch, in order.
    pub entries: Vec<PlanEntry>,
    /// The bytes a recorded start read, packed (recorded plans; nodes that know it fetch
    /// it instead of the entries' spans it covers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<super::pack::PackTable>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// Position of the layer in the image manifest.
    pub layer: u32,
    pub path: String,
    /// Span numbers of the layer index holding the file's bytes.
    pub spans: Vec<u32>,
    pub priority: u32,
    /// Bytes of the file the plan fetches (0 in plans written before this field).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
    /// Why the file is in the plan, briefly ("entrypoint", "interp", "needed by libc.so.6",
    /// "jvm rule", "nss", ...); empty in plans written before this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Patterns kept in the artifact annotation (annotations should stay small).
const MAX_PATTERNS: usize = 256;
/// Files of one directory listed one by one before the directory becomes `dir/*`.
const DIR_COLLAPSE: usize = 8;

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub profile: String,
    pub version: u32,
    /// Uncompressed span bytes the plan may name (the `prefetch_budget` knob).
    pub budget: u64,
}

/// Builds the plan. `layers[i]` is image layer `i`'s index (`None`: not indexed; its
/// files cannot be in the analysis). Entries whose new spans would pass the budget are
/// left out (smaller later ones may still fit).
pub fn build_plan(
    analysis: &Analysis,
    layers: &[Option<&LayerIndex>],
    opts: &PlanOptions,
) -> StartupPlan {
    let mut used = 0u64;
    let mut taken: HashSet<(usize, usize)> = HashSet::new();
    let mut entries = Vec::new();
    for f in &analysis.files {
        let Some(Some(ix)) = layers.get(f.layer) else {
            continue;
        };
        let mut spans: Vec<usize> = Vec::new();
        for r in &f.ranges {
            if r.len == 0 {
                continue;
            }
            let Some(start) = f.data_offset.checked_add(r.offset) else {
                continue;
            };
            let end = start
                .saturating_add(r.len - 1)
                .min(ix.uncompressed_size.saturating_sub(1));
            if start > end {
                continue;
            }
            for s in ix.span_for(start)..=ix.span_for(end) {
                if !spans.contains(&s) {
                    spans.push(s);
                }
            }
        }
        if spans.is_empty() {
            continue;
        }
        let cost: u64 = spans
            .iter()
            .filter(|&&s| !taken.contains(&(f.layer, s)))
            .filter_map(|&s| ix.spans.get(s))
            .map(|s| s.uncompressed_size)
            .sum();
        if used.saturating_add(cost) > opts.budget {
            continue;
        }
        used += cost;
        taken.extend(spans.iter().map(|&s| (f.layer, s)));
        entries.push(PlanEntry {
            layer: u32::try_from(f.layer).unwrap_or(u32::MAX),
            path: f.path.clone(),
            spans: spans
                .into_iter()
                .map(|s| u32::try_from(s).unwrap_or(u32::MAX))
                .collect(),
            priority: f.class as u32,
            bytes: f.ranges.iter().map(|r| r.len).sum(),
            reason: f
                .reasons
                .first()
                .map(|r| short_reason(r))
                .unwrap_or_default(),
        });
    }
    StartupPlan {
        version: opts.version,
        profile: opts.profile.clone(),
        prefetch_budget: opts.budget,
        paths: path_patterns(analysis),
        entries,
        pack: None,
    }
}

/// Longest reason kept in a plan entry.
const MAX_REASON: usize = 64;

/// A plan entry's reason: the analyzer's first reason for the file, shortened to what a
/// reader of `talaria inspect` needs ("needed by libssl.so.3", "jvm rule", "nss", ...).
pub fn short_reason(reason: &str) -> String {
    // The file name; with its directory for names that say little alone.
    let base = |p: &str| {
        let mut it = p.rsplit('/');
        let name = it.next().unwrap_or(p);
        match it.next() {
            Some(dir) if !dir.is_empty() && matches!(name, "__init__.py" | "index.js") => {
                format!("{dir}/{name}")
            }
            _ => name.to_string(),
        }
    };
    // `<prefix> X ...`: the basename of the path after the prefix.
    let after = |prefix: &str| -> Option<String> {
        let rest = reason.strip_prefix(prefix)?;
        let p = rest.split([' ', ')', ':']).next().unwrap_or(rest);
        Some(base(p))
    };
    let r = if reason.starts_with("entrypoint") {
        "entrypoint".to_string()
    } else if reason.starts_with("PT_INTERP") {
        "interp".to_string()
    } else if reason.starts_with("interpreter of") {
        "interp (shebang)".to_string()
    } else if reason.contains("has no shebang") {
        "interp (no shebang: sh)".to_string()
    } else if reason.starts_with("read by the dynamic loader") {
        "ld.so".to_string()
    } else if let Some(rest) = reason.strip_prefix("DT_NEEDED ") {
        match rest.split_once(" of ") {
            Some((_, of)) => format!("needed by {}", base(of)),
            None => "needed".to_string(),
        }
    } else if reason.starts_with("JVM") {
        "jvm rule".to_string()
    } else if reason.starts_with("application jar") || reason.starts_with("class path jar") {
        "app jar".to_string()
    } else if let Some(b) = after("imported by ") {
        format!("imported by {b}")
    } else if let Some(b) = after("required by ") {
        format!("required by {b}")
    } else if let Some(b) = after("run by script ") {
        format!("run by {b}")
    } else if reason.starts_with("node") || reason.starts_with("package.json") {
        "node rule".to_string()
    } else if reason.starts_with("nginx") {
        "nginx rule".to_string()
    } else if reason.starts_with("site .pth") {
        "python site".to_string()
    } else if reason.starts_with("NSS") {
        "nss".to_string()
    } else if reason.starts_with("user and name lookups") {
        "name lookups".to_string()
    } else if reason.starts_with("read by the container runtime") {
        "user and groups".to_string()
    } else if reason.starts_with("TLS") || reason.starts_with("SSL_CERT_FILE") {
        "tls".to_string()
    } else if reason.contains("zone") {
        "time zone".to_string()
    } else if reason.starts_with("locale") || reason.starts_with("iconv") {
        "locale".to_string()
    } else if reason.starts_with("SASL") {
        "sasl plugin".to_string()
    } else if reason.starts_with("sourced") {
        "sourced by script".to_string()
    } else {
        reason.to_string()
    };
    r.chars().take(MAX_REASON).collect()
}

/// The normalized startup path patterns: absolute paths of the files and links, sorted;
/// a directory with many of them becomes `dir/*`; at most [`MAX_PATTERNS`].
pub fn path_patterns(analysis: &Analysis) -> Vec<String> {
    let mut by_dir: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in analysis
        .files
        .iter()
        .map(|f| f.path.as_str())
        .chain(analysis.links.iter().map(String::as_str))
    {
        let (dir, _) = p.rsplit_once('/').unwrap_or(("", p));
        by_dir.entry(dir).or_default().push(p);
    }
    let mut out: Vec<String> = Vec::new();
    for (dir, mut paths) in by_dir {
        paths.sort_unstable();
        paths.dedup();
        if paths.len() > DIR_COLLAPSE {
            out.push(format!("{dir}/*"));
        } else {
            out.extend(paths.into_iter().map(str::to_string));
        }
    }
    out.sort();
    out.truncate(MAX_PATTERNS);
    out
}

#[cfg(test)]
mod tests {
    use super::short_reason;

    #[test]
    fn short_reasons() {
        for (long, short) in [
            ("entrypoint: python3", "entrypoint"),
            ("PT_INTERP of /usr/bin/x (entrypoint (x))", "interp"),
            (
                "DT_NEEDED libz.so.1 of /usr/lib/x86_64-linux-gnu/libnode.so.108",
                "needed by libnode.so.108",
            ),
            ("JVM startup (/usr/lib/jvm/j)", "jvm rule"),
            (
                "imported by /usr/lib/python3.11/site.py",
                "imported by site.py",
            ),
            (
                "imported by /usr/lib/python3.11/json/__init__.py",
                "imported by json/__init__.py",
            ),
            ("run by script /app/run.sh: ls", "run by run.sh"),
            ("NSS service library", "nss"),
            (
                "interpreter of /app/x.sh (shebang): /bin/sh",
                "interp (shebang)",
            ),
        ] {
            assert_eq!(short_reason(long), short, "{long}");
        }
        let odd = "x".repeat(500);
        assert_eq!(short_reason(&odd).len(), 64);
    }
}
