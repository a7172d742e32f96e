//! A generic prefetch plan for images that only have a default artifact (layer indexes, no
//! startup plan): files likely read at start are chosen from the indexes alone — no file
//! content is read, so this is pure, fast and needs no network.
//!
//! Tiers, fetched in this order (the tier rank is the entry's `priority`):
//! 0. `entrypoint`: argv\[0\] resolved on the config's PATH (symlinks followed, bounded),
//!    what it runs through `env` and `sh -c` scripts (bounded), and the script argument of
//!    a well-known interpreter (`python3 app.py`, `java -jar app.jar`).
//! 1. `loader`: the dynamic loader (`ld-linux*`, `ld-musl*`) in the library directories.
//! 2. `libc`: libc-level libraries (libc, libm, libpthread, libdl, librt, ...).
//! 3. `etc`: small system files read at start (ld.so.cache, NSS, passwd, hosts, certs, ...).
//!    Before the directory tiers: they are tiny and nearly always read, while a directory
//!    tree is a guess that may be large.
//! 4. `runtime`: core files of the interpreter the entrypoint is (JVM libraries, a bounded
//!    list of Python core modules).
//! 5. `entrypoint dir`: executables, shared libraries and config files under the
//!    entrypoint's directory tree (`/opt/app/bin/x` → `/opt/app`; never a system bin dir).
//! 6. `workdir`: the same under WorkingDir (not when it is `/`).
//!
//! Within a tier smaller files come first. The budget bounds the files and the uncompressed
//! span bytes newly named (what the prefetch will fetch); a file that does not fit is left
//! out and smaller later ones may still fit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::index::{Entry, EntryKind, LayerIndex};
use crate::startup::plan::PlanEntry;
use crate::startup::shell::{parse_env_args, parse_script};
use crate::startup::{DEFAULT_PATH, ImageConfig};
use crate::view::MergedView;
use crate::view::resolve::{basename, lexical_join, parent, resolve};

/// Limits of a generic plan.
#[derive(Clone, Debug)]
pub struct GenericBudget {
    /// Uncompressed span bytes the plan may name (spans shared by files count once).
    pub max_bytes: u64,
    pub max_files: usize,
}

/// PATH directories tried (a hostile config may list thousands).
const MAX_PATH_DIRS: usize = 64;
/// Interpreter arguments looked at for a script to run.
const MAX_SCRIPT_ARGS: usize = 4;
/// Longest argument or PATH entry considered.
const MAX_ARG_LEN: usize = 4096;
/// Programs followed through `env` and `sh -c` (nesting, and commands in all).
const MAX_CHAIN_DEPTH: usize = 4;
const MAX_CHAIN: usize = 32;
/// Commands of one `sh -c` script followed, and the longest script parsed.
const MAX_SCRIPT_COMMANDS: usize = 8;
const MAX_SCRIPT_LEN: usize = 64 * 1024;

const TIER_NAMES: [&str; 7] = [
    "entrypoint",
    "loader",
    "libc",
    "etc",
    "runtime",
    "entrypoint dir",
    "workdir",
];
const T_ENTRY: usize = 0;
const T_LOADER: usize = 1;
const T_LIBC: usize = 2;
const T_ETC: usize = 3;
const T_RUNTIME: usize = 4;
const T_EPDIR: usize = 5;
const T_WORKDIR: usize = 6;

/// Libraries every dynamically linked program of the C world loads (name before `.so`/`-`).
const LIBC_LEVEL: &[&str] = &[
    "libc",
    "libm",
    "libpthread",
    "libdl",
    "librt",
    "libresolv",
    "libnss_files",
    "libnss_dns",
    "libgcc_s",
    "libstdc++",
];

/// Small system files read while a process starts (resolved, so `localtime` becomes its
/// zoneinfo file).
const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.preload",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/openssl.cnf",
];

/// Directories whose whole tree is never "the entrypoint's directory": they hold the system.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/sbin",
    "/usr",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/lib",
    "/usr/lib",
    "/lib64",
    "/usr/lib64",
    "/etc",
    "/opt",
];

/// Python modules imported before any application code (kept short on purpose: the whole
/// stdlib is far more than a start reads).
const PYTHON_CORE: &[&str] = &[
    "os.py",
    "site.py",
    "stat.py",
    "abc.py",
    "io.py",
    "codecs.py",
    "posixpath.py",
    "genericpath.py",
    "_collections_abc.py",
    "_sitebuiltins.py",
    "encodings/__init__.py",
    "encodings/aliases.py",
    "encodings/utf_8.py",
    "sysconfig.py",
];

/// Files of a JDK/JRE home read by every JVM start.
const JVM_CORE: &[&str] = &[
    "lib/server/libjvm.so",
    "lib/libjli.so",
    "lib/libjava.so",
    "lib/libjimage.so",
    "lib/libzip.so",
    "lib/libnio.so",
    "lib/libnet.so",
    "lib/jvm.cfg",
    "lib/tzdb.dat",
    "conf/security/java.security",
];

/// A chosen file: where its bytes are.
struct Pick<'v> {
    layer: usize,
    entry: &'v Entry,
}

struct Chooser<'v> {
    view: &'v MergedView,
    tiers: Vec<Vec<Pick<'v>>>,
}

impl<'v> Chooser<'v> {
    /// The regular file at `path` (symlinks followed), if any.
    fn file(&self, cwd: &str, path: &str) -> Option<Pick<'v>> {
        if path.is_empty() || path.len() > MAX_ARG_LEN {
            return None;
        }
        let r = resolve(self.view, cwd, path, true).ok()?;
        match r.found {
            Some((layer, entry)) if entry.kind == EntryKind::File => Some(Pick { layer, entry }),
            _ => None,
        }
    }

    fn add(&mut self, tier: usize, pick: Option<Pick<'v>>) {
        if let (Some(t), Some(p)) = (self.tiers.get_mut(tier), pick) {
            t.push(p);
        }
    }

    /// Canonical directory (leading `/`) for `path`, following symlinks when it exists.
    fn dir(&self, path: &str) -> String {
        match resolve(self.view, "/", path, true) {
            Ok(r) if r.kind() == EntryKind::Dir => r.path,
            _ => lexical_join("/", path),
        }
    }

    /// A program as `execve` via PATH finds it: names with a `/` are taken as they are.
    fn program(&self, name: &str, cwd: &str, path_var: &str) -> Option<(String, Pick<'v>)> {
        if name.is_empty() || name.len() > MAX_ARG_LEN {
            return None;
        }
        let found = |full: &str| {
            let r = resolve(self.view, cwd, full, true).ok()?;
            match r.found {
                Some((layer, entry)) if entry.kind == EntryKind::File => {
                    Some((r.path, Pick { layer, entry }))
                }
                _ => None,
            }
        };
        if name.contains('/') {
            return found(name);
        }
        path_var
            .split(':')
            .take(MAX_PATH_DIRS)
            .filter(|d| !d.is_empty() && d.len() <= MAX_ARG_LEN)
            .find_map(|d| found(&format!("{}/{name}", d.trim_end_matches('/'))))
    }

    /// Follows what `argv` runs, adding each program and script to the entrypoint tier;
    /// returns the canonical path of the program that ends up running (the last one `exec`ed
    /// or run by a shell). Bounded by depth and by `left` commands in all.
    fn follow(
        &mut self,
        argv: &[String],
        cwd: &str,
        path_var: &str,
        env: &mut BTreeMap<String, String>,
        depth: usize,
        left: &mut usize,
    ) -> Option<String> {
        if depth > MAX_CHAIN_DEPTH || *left == 0 {
            return None;
        }
        *left -= 1;
        let arg0 = argv.first()?;
        let (path, pick) = self.program(arg0, cwd, path_var)?;
        self.add(T_ENTRY, Some(pick));
        let kind = interpreter_kind(basename(arg0)).or(interpreter_kind(basename(&path)));
        let rest = argv.get(1..).unwrap_or_default();
        match kind {
            Some("env") => {
                let (inner, _) = parse_env_args(rest);
                self.follow(&inner, cwd, path_var, env, depth + 1, left)
                    .or(Some(path))
            }
            Some("shell") => {
                let Some(pos) = rest.iter().position(|a| a == "-c") else {
                    // `sh script.sh`: the script is read.
                    let script = rest.iter().find(|a| !a.starts_with('-'));
                    let pick = script.and_then(|a| self.file(cwd, a));
                    self.add(T_ENTRY, pick);
                    return Some(path);
                };
                let Some(text) = rest.get(pos + 1).filter(|t| t.len() <= MAX_SCRIPT_LEN) else {
                    return Some(path);
                };
                let args = rest.get(pos + 2..).unwrap_or_default();
                let script = parse_script(text, env, args);
                let mut main = None;
                for cmd in script.commands.iter().take(MAX_SCRIPT_COMMANDS) {
                    let got = self.follow(&cmd.argv, cwd, path_var, env, depth + 1, left);
                    if got.is_some() {
                        main = got;
                    }
                }
                main.or(Some(path))
            }
            Some(_) => {
                // `python3 app.py`, `java -jar app.jar`, `node server.js`: the first
                // argument that is a file is the script (options and their values are not).
                let mut classpath = false;
                for a in rest.iter().take(MAX_SCRIPT_ARGS) {
                    if classpath {
                        // `java -cp a.jar:lib/*`: the named jars (globs are not expanded).
                        classpath = false;
                        for part in a.split(':').take(MAX_SCRIPT_ARGS) {
                            if !part.contains('*') {
                                let pick = self.file(cwd, part);
                                self.add(T_ENTRY, pick);
                            }
                        }
                        continue;
                    }
                    if a.starts_with('-') {
                        classpath = matches!(a.as_str(), "-cp" | "-classpath" | "--class-path");
                        continue;
                    }
                    if let Some(pick) = self.file(cwd, a) {
                        self.add(T_ENTRY, Some(pick));
                        break;
                    }
                }
                Some(path)
            }
            None => Some(path),
        }
    }

    /// Application files (see [`is_app_file`]) under the canonical directory `dir`.
    fn app_files_under(&self, dir: &str) -> Vec<Pick<'v>> {
        let prefix = format!("{}/", dir.trim_matches('/'));
        // The view is sorted: everything under `prefix` is contiguous.
        self.view
            .list()
            .skip_while(|(p, _, _)| *p < prefix.as_str())
            .take_while(|(p, _, _)| p.starts_with(prefix.as_str()))
            .filter(|(_, _, e)| e.kind == EntryKind::File && is_app_file(e))
            .map(|(_, layer, entry)| Pick { layer, entry })
            .collect()
    }
}

/// A library directory: lib, lib64, usr/lib, usr/local/lib, or a multiarch one below them.
fn is_lib_dir(dir: &str) -> bool {
    const BASES: &[&str] = &[
        "lib",
        "lib64",
        "lib32",
        "usr/lib",
        "usr/lib64",
        "usr/lib32",
        "usr/local/lib",
    ];
    if BASES.contains(&dir) {
        return true;
    }
    match dir.rsplit_once('/') {
        Some((base, triplet)) => BASES.contains(&base) && triplet.contains("-linux-"),
        None => false,
    }
}

/// `name` is `<stem>.so.<version>` or `<stem>-<version>.so`: what programs load (a bare
/// `<stem>.so` is a link-time file of a -dev package, never loaded at run time).
fn is_lib_named(name: &str, stem: &str) -> bool {
    match name.strip_prefix(stem) {
        Some(rest) => rest.starts_with(".so.") || (rest.starts_with('-') && rest.contains(".so")),
        None => false,
    }
}

fn is_shared_lib(name: &str) -> bool {
    name.ends_with(".so") || name.contains(".so.")
}

fn is_config_or_script(name: &str) -> bool {
    const EXT: &[&str] = &[
        "conf",
        "cfg",
        "ini",
        "json",
        "yaml",
        "yml",
        "toml",
        "properties",
        "xml",
        "env",
        "py",
        "js",
        "mjs",
        "rb",
        "pl",
        "sh",
        "jar",
    ];
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| EXT.contains(&ext))
}

/// Worth prefetching from an application tree: programs, libraries, config and scripts.
fn is_app_file(e: &Entry) -> bool {
    let name = basename(&e.path);
    e.mode & 0o111 != 0 || is_shared_lib(name) || is_config_or_script(name)
}

/// The kind of runtime a program is, by name: the image analyzer's classification
/// ([`super::rules::rule_for`]) in this planner's terms, plus Ruby and Perl, which the
/// analyzer has no rule for.
fn interpreter_kind(name: &str) -> Option<&'static str> {
    match super::rules::rule_for(name, name) {
        Some("jvm") => Some("java"),
        Some("node") => Some("script"),
        Some("nginx") => None,
        Some(kind) => Some(kind),
        None if name.starts_with("ruby") || name.starts_with("perl") => Some("script"),
        None => None,
    }
}

/// Builds the generic plan (see the module docs). `layers[i]` is image layer `i`'s index
/// (`None`: not indexed, its files are not in the view). Never panics on hostile input.
pub fn generic_plan(
    config: &ImageConfig,
    layers: &[Option<Arc<LayerIndex>>],
    budget: &GenericBudget,
) -> Vec<PlanEntry> {
    if budget.max_files == 0 || budget.max_bytes == 0 {
        return Vec::new();
    }
    let refs: Vec<Option<&LayerIndex>> = layers.iter().map(|l| l.as_deref()).collect();
    let view = MergedView::new(&refs);
    let mut c = Chooser {
        view: &view,
        tiers: (0..TIER_NAMES.len()).map(|_| Vec::new()).collect(),
    };

    let workdir = if config.working_dir.is_empty() {
        "/".to_string()
    } else {
        c.dir(&config.working_dir)
    };
    let path_var = config.env_var("PATH").unwrap_or(DEFAULT_PATH);
    let argv = config.argv();

    // The entrypoint chain: argv[0], what `env` and `sh -c` run, interpreters' scripts.
    let mut env: BTreeMap<String, String> = config
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut budget_left = MAX_CHAIN;
    let main = c.follow(&argv, &workdir, path_var, &mut env, 0, &mut budget_left);
    let entry_path = main.clone();
    let runtime = main.and_then(|p| interpreter_kind(basename(&p)).map(|k| (k, p)));

    // Loader and libc-level libraries: one pass over the view.
    for (p, layer, e) in view.list() {
        if !matches!(e.kind, EntryKind::File | EntryKind::Symlink) {
            continue;
        }
        let (dir, name) = p.rsplit_once('/').unwrap_or(("", p));
        if !is_lib_dir(dir) {
            continue;
        }
        let tier = if name.starts_with("ld-linux") || name.starts_with("ld-musl") {
            T_LOADER
        } else if LIBC_LEVEL.iter().any(|s| is_lib_named(name, s)) {
            T_LIBC
        } else {
            continue;
        };
        let pick = if e.kind == EntryKind::File {
            Some(Pick { layer, entry: e })
        } else {
            c.file("/", &format!("/{p}"))
        };
        c.add(tier, pick);
    }

    for f in ETC_FILES {
        let pick = c.file("/", f);
        c.add(T_ETC, pick);
    }

    if let Some((kind, path)) = &runtime {
        match *kind {
            "python" => {
                let name = basename(path);
                for prefix in ["/usr/lib", "/usr/local/lib"] {
                    for m in PYTHON_CORE {
                        let pick = c.file("/", &format!("{prefix}/{name}/{m}"));
                        c.add(T_RUNTIME, pick);
                    }
                }
            }
            "java" => {
                // <home>/bin/java → <home>.
                let home = parent(parent(path)).to_string();
                for f in JVM_CORE {
                    let pick = c.file("/", &format!("{home}/{f}"));
                    c.add(T_RUNTIME, pick);
                }
            }
            _ => {}
        }
    }

    if let Some(path) = &entry_path {
        let mut dir = parent(path);
        if matches!(basename(dir), "bin" | "sbin") {
            dir = parent(dir);
        }
        if !SYSTEM_DIRS.contains(&dir) {
            let picks = c.app_files_under(dir);
            if let Some(t) = c.tiers.get_mut(T_EPDIR) {
                t.extend(picks);
            }
        }
    }
    if workdir != "/" && !SYSTEM_DIRS.contains(&workdir.as_str()) {
        let picks = c.app_files_under(&workdir);
        if let Some(t) = c.tiers.get_mut(T_WORKDIR) {
            t.extend(picks);
        }
    }

    select(c.tiers, layers, budget)
}

/// Turns the tiers into plan entries within the budget.
fn select(
    mut tiers: Vec<Vec<Pick<'_>>>,
    layers: &[Option<Arc<LayerIndex>>],
    budget: &GenericBudget,
) -> Vec<PlanEntry> {
    let mut out = Vec::new();
    let mut used = 0u64;
    // Files already chosen, by where their bytes are (hard links share them).
    let mut chosen: HashSet<(usize, u64)> = HashSet::new();
    let mut taken: HashSet<(usize, usize)> = HashSet::new();
    for (rank, picks) in tiers.iter_mut().enumerate() {
        if rank != T_ENTRY {
            // The entrypoint tier keeps argv order; the others go small first.
            picks.sort_by(|a, b| (a.entry.size, &a.entry.path).cmp(&(b.entry.size, &b.entry.path)));
        }
        for p in picks.iter() {
            if out.len() >= budget.max_files {
                return out;
            }
            let e = p.entry;
            if e.size == 0 || chosen.contains(&(p.layer, e.offset)) {
                continue;
            }
            let Some(Some(ix)) = layers.get(p.layer) else {
                continue;
            };
            let Some((first, last)) = span_range(ix, e) else {
                continue;
            };
            let mut cost = 0u64;
            let mut fits = true;
            for s in first..=last {
                if taken.contains(&(p.layer, s)) {
                    continue;
                }
                cost = cost.saturating_add(ix.spans.get(s).map_or(0, |s| s.uncompressed_size));
                if used.saturating_add(cost) > budget.max_bytes {
                    fits = false;
                    break;
                }
            }
            if !fits {
                continue;
            }
            used = used.saturating_add(cost);
            taken.extend((first..=last).map(|s| (p.layer, s)));
            chosen.insert((p.layer, e.offset));
            out.push(PlanEntry {
                layer: u32::try_from(p.layer).unwrap_or(u32::MAX),
                // The path of the entry holding the bytes (a hard link's target), as the
                // layer's FUSE tree and the materializer know the file.
                path: format!("/{}", e.path),
                spans: (first..=last)
                    .map(|s| u32::try_from(s).unwrap_or(u32::MAX))
                    .collect(),
                priority: u32::try_from(rank).unwrap_or(u32::MAX),
                bytes: e.size,
                reason: TIER_NAMES.get(rank).copied().unwrap_or("").to_string(),
            });
        }
    }
    out
}

/// First and last span holding the bytes of `e`; `None` when they are not in the layer.
fn span_range(ix: &LayerIndex, e: &Entry) -> Option<(usize, usize)> {
    if ix.spans.is_empty() || e.offset >= ix.uncompressed_size {
        return None;
    }
    let end = e
        .offset
        .saturating_add(e.size)
        .min(ix.uncompressed_size)
        .checked_sub(1)?;
    let (first, last) = (ix.span_for(e.offset), ix.span_for(end));
    (first <= last && last < ix.spans.len()).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Compression;
    use crate::index::indexer::{IndexOptions, index_layer};

    enum T<'a> {
        Dir(&'a str),
        File(&'a str, usize, u32),
        Link(&'a str, &'a str),
        Whiteout(&'a str),
        Opaque(&'a str),
    }

    fn layer(items: &[T<'_>], span: u64) -> Arc<LayerIndex> {
        let mut b = tar::Builder::new(Vec::new());
        for it in items {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1);
            h.set_mode(0o755);
            let (path, size, data): (String, usize, Vec<u8>) = match it {
                T::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    (format!("{p}/"), 0, Vec::new())
                }
                T::File(p, n, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    (p.to_string(), *n, vec![b'x'; *n])
                }
                T::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_link_name(target).unwrap();
                    (p.to_string(), 0, Vec::new())
                }
                T::Whiteout(p) => {
                    let (d, n) = p.rsplit_once('/').unwrap_or(("", p));
                    h.set_entry_type(tar::EntryType::Regular);
                    let wh = if d.is_empty() {
                        format!(".wh.{n}")
                    } else {
                        format!("{d}/.wh.{n}")
                    };
                    (wh, 0, Vec::new())
                }
                T::Opaque(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    (format!("{d}/.wh..wh..opq"), 0, Vec::new())
                }
            };
            h.set_size(size as u64);
            b.append_data(&mut h, path, data.as_slice()).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let out = index_layer(
            tar.as_slice(),
            Compression::None,
            &IndexOptions { span_size: span },
        )
        .unwrap();
        Arc::new(out.index)
    }

    fn cfg(entrypoint: &[&str], workdir: &str, env: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: Vec::new(),
            env: env.iter().map(|s| s.to_string()).collect(),
            working_dir: workdir.to_string(),
            user: String::new(),
        }
    }

    fn big() -> GenericBudget {
        GenericBudget {
            max_bytes: 1 << 40,
            max_files: 10_000,
        }
    }

    fn base() -> Arc<LayerIndex> {
        layer(
            &[
                T::Dir("usr"),
                T::Dir("usr/bin"),
                T::File("usr/bin/python3.11", 5000, 0o755),
                T::Link("usr/bin/python3", "python3.11"),
                T::File("usr/bin/other", 100, 0o755),
                T::Dir("usr/lib/x86_64-linux-gnu"),
                T::File("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", 2000, 0o755),
                T::File("usr/lib/x86_64-linux-gnu/libc.so.6", 3000, 0o755),
                T::File("usr/lib/x86_64-linux-gnu/libm.so.6", 1000, 0o644),
                T::File("usr/lib/x86_64-linux-gnu/libm.so", 10, 0o644),
                T::File("usr/lib/x86_64-linux-gnu/libcrypto.so.3", 4000, 0o644),
                T::File("usr/lib/python3.11/os.py", 300, 0o644),
                T::File("usr/lib/python3.11/json/decoder.py", 300, 0o644),
                T::Link("lib64", "usr/lib"),
                T::Dir("etc"),
                T::File("etc/passwd", 50, 0o644),
                T::File("etc/ld.so.cache", 70, 0o644),
                T::File("etc/hosts", 20, 0o644),
                T::Link("etc/localtime", "/usr/share/zoneinfo/UTC"),
                T::File("usr/share/zoneinfo/UTC", 100, 0o644),
                T::Dir("app"),
                T::File("app/main.py", 400, 0o644),
                T::File("app/settings.yaml", 40, 0o644),
                T::File("app/README.md", 40, 0o644),
                T::File("app/old.py", 40, 0o644),
                T::Dir("app/cache"),
                T::File("app/cache/x.py", 40, 0o644),
            ],
            1024,
        )
    }

    fn reasons(plan: &[PlanEntry]) -> Vec<(String, String)> {
        plan.iter()
            .map(|e| (e.path.clone(), e.reason.clone()))
            .collect()
    }

    #[test]
    fn tiers_in_order_with_merged_view() {
        let upper = layer(
            &[
                T::Whiteout("app/old.py"),
                T::Opaque("app/cache"),
                T::File("app/main.py", 500, 0o644),
            ],
            1024,
        );
        let layers = vec![Some(base()), None, Some(upper)];
        let c = cfg(&["python3", "main.py"], "/app", &["PATH=/usr/bin"]);
        let plan = generic_plan(&c, &layers, &big());
        let r = reasons(&plan);
        let exp: Vec<(&str, &str)> = vec![
            ("/usr/bin/python3.11", "entrypoint"),
            ("/app/main.py", "entrypoint"),
            ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "loader"),
            ("/usr/lib/x86_64-linux-gnu/libm.so.6", "libc"),
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", "libc"),
            ("/etc/hosts", "etc"),
            ("/etc/passwd", "etc"),
            ("/etc/ld.so.cache", "etc"),
            ("/usr/share/zoneinfo/UTC", "etc"),
            ("/usr/lib/python3.11/os.py", "runtime"),
            ("/app/settings.yaml", "workdir"),
        ];
        let exp: Vec<(String, String)> = exp
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(r, exp);
        // main.py comes from the upper layer (image layer 2), with its size.
        let main = plan.iter().find(|e| e.path == "/app/main.py").unwrap();
        assert_eq!((main.layer, main.bytes), (2, 500));
        let prios: Vec<u32> = plan.iter().map(|e| e.priority).collect();
        assert!(prios.windows(2).all(|w| w[0] <= w[1]), "{prios:?}");
        // Every entry's spans cover its bytes.
        for e in &plan {
            let ix = layers[e.layer as usize].as_ref().unwrap();
            let ent = ix.find(&e.path).unwrap();
            let first = ix.span_for(ent.offset) as u32;
            let last = ix.span_for(ent.offset + ent.size - 1) as u32;
            assert_eq!(e.spans, (first..=last).collect::<Vec<_>>(), "{}", e.path);
        }
    }

    #[test]
    fn entrypoint_dir_tree_and_budget() {
        let l = layer(
            &[
                T::Dir("opt/svc/bin"),
                T::File("opt/svc/bin/svc", 3000, 0o755),
                T::File("opt/svc/lib/libsvc.so.1", 2000, 0o644),
                T::File("opt/svc/conf/svc.toml", 100, 0o644),
                T::File("opt/svc/data/blob.bin", 100, 0o644),
                T::File("etc/passwd", 10, 0o644),
            ],
            1024,
        );
        let layers = vec![Some(l)];
        let c = cfg(&["/opt/svc/bin/svc"], "", &[]);
        let plan = generic_plan(&c, &layers, &big());
        assert_eq!(
            reasons(&plan)
                .iter()
                .map(|(p, r)| format!("{p} {r}"))
                .collect::<Vec<_>>(),
            vec![
                "/opt/svc/bin/svc entrypoint",
                "/etc/passwd etc",
                "/opt/svc/conf/svc.toml entrypoint dir",
                "/opt/svc/lib/libsvc.so.1 entrypoint dir",
            ]
        );
        // The file budget stops after two; a tight byte budget drops what does not fit.
        let two = generic_plan(
            &c,
            &layers,
            &GenericBudget {
                max_bytes: 1 << 30,
                max_files: 2,
            },
        );
        assert_eq!(two.len(), 2);
        let tight = generic_plan(
            &c,
            &layers,
            &GenericBudget {
                max_bytes: 2048,
                max_files: 100,
            },
        );
        let cost: u64 = {
            let ix = layers[0].as_ref().unwrap();
            let mut spans: Vec<u32> = tight.iter().flat_map(|e| e.spans.clone()).collect();
            spans.sort();
            spans.dedup();
            spans
                .iter()
                .map(|&s| ix.spans[s as usize].uncompressed_size)
                .sum()
        };
        assert!(cost <= 2048, "{cost}");
        assert!(!tight.iter().any(|e| e.path == "/opt/svc/bin/svc"));
    }

    #[test]
    fn system_bin_dir_is_not_a_tree_and_loops_are_safe() {
        let l = layer(
            &[
                T::File("usr/bin/tool", 100, 0o755),
                T::File("usr/bin/other", 100, 0o755),
                T::Link("usr/bin/a", "b"),
                T::Link("usr/bin/b", "a"),
            ],
            1024,
        );
        let layers = vec![Some(l)];
        let plan = generic_plan(&cfg(&["tool"], "/", &[]), &layers, &big());
        assert_eq!(
            reasons(&plan),
            vec![("/usr/bin/tool".into(), "entrypoint".into())]
        );
        // A symlink loop as the entrypoint yields nothing, without hanging.
        let plan = generic_plan(&cfg(&["a"], "/", &[]), &layers, &big());
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn shell_and_env_chain_to_a_jvm() {
        let l = layer(
            &[
                T::File("bin/sh", 900, 0o755),
                T::File("usr/bin/env", 800, 0o755),
                T::Link("usr/bin/java", "/usr/lib/jvm/j17/bin/java"),
                T::File("usr/lib/jvm/j17/bin/java", 700, 0o755),
                T::File("usr/lib/jvm/j17/lib/server/libjvm.so", 5000, 0o644),
                T::File("usr/lib/jvm/j17/lib/jvm.cfg", 30, 0o644),
                T::File("usr/lib/jvm/j17/lib/modules", 9000, 0o644),
                T::File("app/app.jar", 600, 0o644),
            ],
            1024,
        );
        let layers = vec![Some(l)];
        let c = cfg(
            &[
                "/bin/sh",
                "-c",
                "set -e; exec env JAVA_OPTS=-Xmx1g java -cp /app/app.jar:/lib/* Main",
            ],
            "/",
            &["PATH=/usr/bin:/bin"],
        );
        let plan = generic_plan(&c, &layers, &big());
        let got: Vec<String> = reasons(&plan)
            .iter()
            .map(|(p, r)| format!("{p} {r}"))
            .collect();
        assert_eq!(
            got,
            vec![
                "/bin/sh entrypoint",
                "/usr/bin/env entrypoint",
                "/usr/lib/jvm/j17/bin/java entrypoint",
                "/app/app.jar entrypoint",
                "/usr/lib/jvm/j17/lib/jvm.cfg runtime",
                "/usr/lib/jvm/j17/lib/server/libjvm.so runtime",
            ]
        );
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let mut ix = (*layer(
            &[
                T::File("usr/bin/x", 5000, 0o755),
                T::File("usr/bin/sh", 50, 0o755),
                T::File("usr/bin/env", 50, 0o755),
            ],
            1024,
        ))
        .clone();
        // Offsets and sizes past the end, and an index without spans.
        ix.entries.push(Entry {
            path: "etc/passwd".into(),
            size: u64::MAX,
            offset: u64::MAX - 1,
            ..ix.entries[0].clone()
        });
        let mut nospans = ix.clone();
        nospans.spans.clear();
        let long = "a/".repeat(5000);
        let nested = "sh -c 'x; sh -c x; env sh -c x'; ".repeat(1000);
        let path = format!("PATH={}", ":".repeat(100_000));
        for layers in [
            vec![Some(Arc::new(ix))],
            vec![Some(Arc::new(nospans))],
            vec![None],
        ] {
            for c in [
                cfg(&["x"], "", &[]),
                cfg(&[long.as_str()], &long, &[path.as_str()]),
                cfg(&["env", "-i", "python3", "-c", "x"], "../../..", &[]),
                cfg(&[], "", &[]),
                cfg(&["env"; 100], "", &[]),
                cfg(&["sh", "-c", &nested], "", &[]),
            ] {
                let _ = generic_plan(&c, &layers, &big());
            }
        }
        let plan = generic_plan(&cfg(&["x"], "", &[]), &[], &big());
        assert!(plan.is_empty());
    }
}
