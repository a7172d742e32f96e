//! Path resolution inside the image root, through the merged view: symlinks in any
//! component are followed (at most [`MAX_SYMLINKS`] hops, so loops end), `..` stops at the
//! root and absolute link targets restart at the root, so a path never leaves the image.

use std::collections::VecDeque;

use crate::index::{Entry, EntryKind};
use crate::view::MergedView;

/// Symlinks followed while resolving one path (Linux's limit).
pub const MAX_SYMLINKS: usize = 40;
/// Longest canonical path (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Components processed while resolving one path (links add components).
const MAX_STEPS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{path}: no such file ({at} does not exist)")]
    NotFound { path: String, at: String },
    #[error("{path}: {at} is not a directory")]
    NotADirectory { path: String, at: String },
    #[error("{path}: more than {MAX_SYMLINKS} symbolic links (a loop?)")]
    Loop { path: String },
    #[error("{path}: path too long after following links")]
    TooLong { path: String },
}

/// A path resolved in the merged view.
#[derive(Debug, Clone)]
pub struct Resolved<'v> {
    /// Canonical path with a leading `/` (`/` for the root).
    pub path: String,
    /// Layer and entry (`None` for a directory without its own entry, e.g. the root).
    pub found: Option<(usize, &'v Entry)>,
    /// Canonical paths of the symlinks traversed, in order.
    pub links: Vec<String>,
}

impl Resolved<'_> {
    pub fn kind(&self) -> EntryKind {
        self.found.map(|(_, e)| e.kind).unwrap_or(EntryKind::Dir)
    }
}

/// Joins `path` onto the directory `base` (both inside the image) without touching the
/// view: `..` clamps at the root. The result has a leading `/`.
pub fn lexical_join(base: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let start = if path.starts_with('/') { "" } else { base };
    for c in start.split('/').chain(path.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Parent directory of a canonical path (`/` for top-level names and the root).
/// The last component of `path` (all of it when it has no `/`).
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Resolves `path` (absolute, or relative to the canonical directory `cwd`). With
/// `follow_last`, a symlink in the last component is followed too (as `open`/`execve` do).
pub fn resolve<'v>(
    view: &'v MergedView,
    cwd: &str,
    path: &str,
    follow_last: bool,
) -> Result<Resolved<'v>, ResolveError> {
    let err_path = || path.chars().take(256).collect::<String>();
    if path.len() > MAX_PATH {
        return Err(ResolveError::TooLong { path: err_path() });
    }
    // `cur` is the canonical path so far without the leading '/'.
    let mut cur = String::new();
    let mut rest: VecDeque<String> = VecDeque::new();
    let start = if path.starts_with('/') { "" } else { cwd };
    for c in start.split('/').chain(path.split('/')) {
        if !c.is_empty() && c != "." {
            rest.push_back(c.to_string());
        }
    }
    let mut links = Vec::new();
    let mut found: Option<(usize, &Entry)> = None;
    let mut steps = 0usize;
    while let Some(c) = rest.pop_front() {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(ResolveError::TooLong { path: err_path() });
        }
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            match cur.rfind('/') {
                Some(i) => cur.truncate(i),
                None => cur.clear(),
            }
            found = None;
            continue;
        }
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(&c);
        if cur.len() > MAX_PATH {
            return Err(ResolveError::TooLong { path: err_path() });
        }
        let is_last = rest.is_empty();
        found = view.lookup(&cur);
        let Some((_, entry)) = found else {
            if is_last {
                return Err(ResolveError::NotFound {
                    path: err_path(),
                    at: format!("/{cur}"),
                });
            }
            // A directory may exist only implicitly (no entry of its own in the tar).
            continue;
        };
        match entry.kind {
            EntryKind::Symlink if !is_last || follow_last => {
                if links.len() >= MAX_SYMLINKS {
                    return Err(ResolveError::Loop { path: err_path() });
                }
                links.push(format!("/{cur}"));
                let target = entry.link_target.as_deref().unwrap_or("");
                if target.len() > MAX_PATH {
                    return Err(ResolveError::TooLong { path: err_path() });
                }
                // The link is replaced by its target, relative to the link's directory.
                match cur.rfind('/') {
                    Some(i) => cur.truncate(i),
                    None => cur.clear(),
                }
                if target.starts_with('/') {
                    cur.clear();
                }
                for t in target.split('/').rev() {
                    if !t.is_empty() && t != "." {
                        rest.push_front(t.to_string());
                    }
                }
                found = None;
            }
            EntryKind::Dir | EntryKind::Symlink => {}
            _ if !is_last => {
                return Err(ResolveError::NotADirectory {
                    path: err_path(),
                    at: format!("/{cur}"),
                });
            }
            _ => {}
        }
    }
    if found.is_none() && !cur.is_empty() {
        // Ended on `..` or a link to a directory: look the final path up again.
        // (`None` again: a directory that exists only implicitly.)
        found = view.lookup(&cur);
    }
    Ok(Resolved {
        path: format!("/{cur}"),
        found,
        links,
    })
}

/// Names in the directory `dir` (canonical, leading `/`), sorted, at most `limit`;
/// directories that exist only implicitly (as parents of deeper entries) are included.
/// Scans the view (there is no per-directory index), so callers use it sparingly.
pub fn list_dir(view: &MergedView, dir: &str, limit: usize) -> Vec<String> {
    let d = dir.trim_start_matches('/');
    let prefix = if d.is_empty() {
        String::new()
    } else {
        format!("{d}/")
    };
    let mut out: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    // The view is sorted: entries under `prefix` are contiguous.
    for (p, _, _) in view
        .list()
        .skip_while(|(p, _, _)| !p.starts_with(prefix.as_str()))
        .take_while(|(p, _, _)| p.starts_with(prefix.as_str()))
    {
        let Some(rest) = p.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let name = rest.split('/').next().unwrap_or("");
        // ("a-b" sorts between "a" and "a/x", so a name can come back: keep a set.)
        if name.is_empty() || out.contains(name) {
            continue;
        }
        if out.len() >= limit {
            break;
        }
        out.insert(name.to_string());
    }
    out.into_iter().collect()
}
