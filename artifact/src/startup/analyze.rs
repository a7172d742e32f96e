//! The analyzer: follows the container's startup from the image config through the merged
//! view, reading only the bytes it needs. See the module docs of [`super`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use tracing::debug;

use super::elf::{self, Header};
use super::jimage;
use super::shell;
use super::{
    Analysis, ByteRange, DEFAULT_PATH, FileClass, FileReader, FoundFile, ImageConfig, Note,
};
use crate::index::{Entry, EntryKind};
use crate::view::MergedView;
use crate::view::resolve::{self, ResolveError, basename, lexical_join, parent};

/// Programs (exec chain steps) followed in one analysis.
const MAX_EXECS: usize = 64;
/// Shared objects in one ELF closure.
const MAX_OBJECTS: usize = 512;
/// Files recorded in one analysis.
pub(super) const MAX_FILES: usize = 8192;
/// Bytes the analyzer reads from the image in total.
const MAX_READ: u64 = 64 << 20;
/// Notes kept (later ones are counted, not stored).
const MAX_NOTES: usize = 256;
/// Reasons kept per file.
const MAX_REASONS: usize = 8;
/// Largest script read whole.
pub(super) const MAX_SCRIPT: u64 = 256 * 1024;
/// Shebang/exec nesting (the kernel allows a handful of interpreter levels).
const MAX_DEPTH: usize = 8;
/// ELF objects at least this big are planned as the byte ranges their loading reads
/// ([`elf::loader_ranges`]); smaller ones whole (a few read-around windows would pull
/// most of them anyway, and the plan fetches spans of several MiB).
pub(super) const RANGES_MIN_SIZE: u64 = 1 << 20;
/// Predicted ranges covering at least this share of a file (in percent) become the whole
/// file.
const RANGES_MAX_SHARE: u64 = 90;

/// One program start to follow.
#[derive(Debug, Clone)]
pub(super) struct Exec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Canonical working directory.
    pub cwd: String,
    pub reason: String,
    pub depth: usize,
}

/// A file found in the view.
#[derive(Debug, Clone)]
pub(super) struct Hit {
    pub path: String,
    pub layer: usize,
    pub entry: Entry,
}

pub(super) struct Ctx<'v, R> {
    pub view: &'v MergedView,
    reader: R,
    pub env: BTreeMap<String, String>,
    files: Vec<FoundFile>,
    by_path: HashMap<String, usize>,
    links: Vec<String>,
    link_set: HashSet<String>,
    notes: Vec<Note>,
    dropped_notes: usize,
    bytes_read: u64,
    elf_seen: HashSet<String>,
    /// Byte ranges predicted for big ELF objects the loader maps and big data files of a
    /// known format (applied to their files at the end: however else a file was found, the
    /// loader maps it).
    elf_ranges: HashMap<String, Vec<ByteRange>>,
    headers: HashMap<String, Option<Header>>,
    ld_conf: Option<Vec<String>>,
    /// Class and machine of the first ELF executable.
    pub abi: Option<(bool, u16)>,
    /// Sonames/paths of the loaded objects (system-file rules look at them).
    pub loaded: Vec<String>,
    pub queue: VecDeque<Exec>,
    pub runtimes: HashSet<&'static str>,
}

/// Analyzes an image: the files its container is predicted to read at startup, in expected
/// access order, each with the reasons it was added. Never fails: what cannot be followed
/// is recorded in [`Analysis::notes`].
pub async fn analyze<R: FileReader>(
    config: &ImageConfig,
    view: &MergedView,
    reader: R,
) -> Analysis {
    let t0 = std::time::Instant::now();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for kv in &config.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    let mut cx = Ctx {
        view,
        reader,
        env: env.clone(),
        files: Vec::new(),
        by_path: HashMap::new(),
        links: Vec::new(),
        link_set: HashSet::new(),
        notes: Vec::new(),
        dropped_notes: 0,
        bytes_read: 0,
        elf_seen: HashSet::new(),
        elf_ranges: HashMap::new(),
        headers: HashMap::new(),
        ld_conf: None,
        abi: None,
        loaded: Vec::new(),
        queue: VecDeque::new(),
        runtimes: HashSet::new(),
    };
    let wd = if config.working_dir.is_empty() {
        "/"
    } else {
        config.working_dir.as_str()
    };
    let cwd = match resolve::resolve(view, "/", wd, true) {
        Ok(r) => r.path,
        Err(e) => {
            // The runtime creates a missing WorkingDir; relative paths still start there.
            debug!(error = %e, "working directory not in the image");
            lexical_join("/", wd)
        }
    };
    let argv = config.argv();
    if argv.is_empty() {
        cx.note(
            "config",
            "the image has neither Entrypoint nor Cmd: nothing to start",
        );
    } else {
        cx.queue.push_back(Exec {
            argv,
            env,
            cwd,
            reason: "entrypoint".into(),
            depth: 0,
        });
    }
    let mut execs = 0;
    while let Some(x) = cx.queue.pop_front() {
        execs += 1;
        if execs > MAX_EXECS {
            cx.note(
                "exec",
                &format!("more than {MAX_EXECS} programs to follow; the rest are skipped"),
            );
            break;
        }
        cx.exec(x).await;
    }
    cx.system_files().await;
    if cx.dropped_notes > 0 {
        let n = cx.dropped_notes;
        cx.notes.push(Note {
            subject: "analysis".into(),
            message: format!("{n} more notes were dropped"),
        });
    }
    cx.data_ranges().await;
    for f in &mut cx.files {
        if let Some(r) = cx.elf_ranges.remove(&f.path) {
            f.ranges = r;
        }
    }
    // Expected access order: the exec chain, then libraries, runtime files, system files;
    // discovery order within a class (stable sort).
    cx.files.sort_by_key(|f| f.class);
    debug!(files = cx.files.len(), notes = cx.notes.len(), elapsed = ?t0.elapsed(), "startup analysis done");
    Analysis {
        files: cx.files,
        links: cx.links,
        notes: cx.notes,
        bytes_read: cx.bytes_read,
    }
}

impl<R: FileReader> Ctx<'_, R> {
    pub fn note(&mut self, subject: &str, message: &str) {
        if self.notes.len() >= MAX_NOTES {
            self.dropped_notes += 1;
            return;
        }
        debug!(subject, message, "startup analysis note");
        self.notes.push(Note {
            subject: subject.chars().take(512).collect(),
            message: message.chars().take(1024).collect(),
        });
    }

    fn record_links(&mut self, links: Vec<String>) {
        for l in links {
            if self.link_set.len() < MAX_FILES && self.link_set.insert(l.clone()) {
                self.links.push(l);
            }
        }
    }

    /// Resolves a path to a regular file (following every symlink), recording the links.
    pub fn resolve_file(&mut self, cwd: &str, path: &str) -> Result<Hit, ResolveError> {
        let r = resolve::resolve(self.view, cwd, path, true)?;
        let path_out = r.path.clone();
        let found = r.found.map(|(l, e)| (l, e.clone()));
        self.record_links(r.links);
        match found {
            Some((layer, entry)) if entry.kind == EntryKind::File => Ok(Hit {
                path: path_out,
                layer,
                entry,
            }),
            _ => Err(ResolveError::NotFound {
                path: path.chars().take(256).collect(),
                at: format!("{path_out} (not a regular file)"),
            }),
        }
    }

    /// Like [`Ctx::resolve_file`], `None` when absent (the common case for optional files).
    pub fn try_file(&mut self, cwd: &str, path: &str) -> Option<Hit> {
        self.resolve_file(cwd, path).ok()
    }

    /// Canonical directory path, if it exists as a directory.
    pub fn try_dir(&mut self, cwd: &str, path: &str) -> Option<String> {
        let r = resolve::resolve(self.view, cwd, path, true).ok()?;
        let is_dir = r.kind() == EntryKind::Dir;
        let p = r.path.clone();
        self.record_links(r.links);
        is_dir.then_some(p)
    }

    /// Records a file (whole file); a file found again gets the extra reason and keeps
    /// the earliest class.
    pub fn add(&mut self, hit: &Hit, class: FileClass, reason: &str) -> bool {
        self.add_ranges(hit, class, reason, None)
    }

    pub fn add_ranges(
        &mut self,
        hit: &Hit,
        class: FileClass,
        reason: &str,
        ranges: Option<Vec<ByteRange>>,
    ) -> bool {
        if let Some(&i) = self.by_path.get(&hit.path) {
            if let Some(f) = self.files.get_mut(i) {
                f.class = f.class.min(class);
                if f.reasons.len() < MAX_REASONS && !f.reasons.iter().any(|r| r == reason) {
                    f.reasons.push(reason.to_string());
                }
                // A whole-file request wins over partial ranges.
                if ranges.is_none() {
                    f.ranges = whole(hit.entry.size);
                }
            }
            return false;
        }
        if self.files.len() >= MAX_FILES {
            self.note(
                &hit.path,
                &format!("more than {MAX_FILES} files; not recorded"),
            );
            return false;
        }
        self.by_path.insert(hit.path.clone(), self.files.len());
        self.files.push(FoundFile {
            path: hit.path.clone(),
            layer: hit.layer,
            size: hit.entry.size,
            data_offset: hit.entry.offset,
            class,
            ranges: ranges.unwrap_or_else(|| whole(hit.entry.size)),
            reasons: vec![reason.to_string()],
        });
        true
    }

    pub fn has(&self, path: &str) -> bool {
        self.by_path.contains_key(path)
    }

    /// Reads bytes of a file for analysis (bounded in total).
    pub async fn read(&mut self, hit: &Hit, offset: u64, len: u64) -> Option<Bytes> {
        let len = len.min(hit.entry.size.saturating_sub(offset));
        if len == 0 {
            return Some(Bytes::new());
        }
        if self.bytes_read.saturating_add(len) > MAX_READ {
            self.note(
                &hit.path,
                &format!("analysis read budget of {MAX_READ} bytes is spent; not read"),
            );
            return None;
        }
        self.bytes_read += len;
        match self.reader.read(hit.layer, &hit.entry, offset, len).await {
            Ok(b) => Some(b),
            Err(e) => {
                self.note(&hit.path, &format!("reading {offset}+{len}: {e}"));
                None
            }
        }
    }

    /// Finds a program as `execvp` does: a name with `/` is a path (relative to `cwd`),
    /// else the first executable regular file in PATH.
    pub fn find_program(&mut self, name: &str, x: &Exec) -> Result<Hit, String> {
        if name.is_empty() {
            return Err("empty program name".into());
        }
        if name.contains('/') {
            return self.resolve_file(&x.cwd, name).map_err(|e| e.to_string());
        }
        let path = x
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| DEFAULT_PATH.into());
        for dir in path.split(':').take(64) {
            let dir = if dir.is_empty() { "." } else { dir };
            let cand = format!("{}/{name}", dir.trim_end_matches('/'));
            if let Ok(hit) = self.resolve_file(&x.cwd, &cand)
                && hit.entry.mode & 0o111 != 0
            {
                return Ok(hit);
            }
        }
        Err(format!("{name:?} is not an executable file on PATH {path}"))
    }

    /// Follows one program start.
    async fn exec(&mut self, x: Exec) {
        let Some(name) = x.argv.first().cloned() else {
            return;
        };
        let hit = match self.find_program(&name, &x) {
            Ok(h) => h,
            Err(e) => {
                self.note(&name, &format!("{}: {e}", x.reason));
                return;
            }
        };
        self.add(
            &hit,
            FileClass::Entrypoint,
            &format!("{}: {name}", x.reason),
        );
        let Some(head) = self.read(&hit, 0, shell::SHEBANG_MAX as u64).await else {
            return;
        };
        if elf::is_elf(&head) {
            self.elf_closure(&hit, &format!("{} ({name})", x.reason))
                .await;
            self.runtime_rules(&hit, &x).await;
        } else if let Some((interp, arg)) = shell::parse_shebang(&head) {
            let mut argv = vec![interp.clone()];
            argv.extend(arg);
            argv.push(hit.path.clone());
            argv.extend(x.argv.iter().skip(1).cloned());
            self.push_exec(
                &x,
                argv,
                format!("interpreter of {} (shebang)", hit.path),
                true,
            );
        } else {
            // execvp runs a file without a known format with /bin/sh.
            let mut argv = vec!["/bin/sh".to_string(), hit.path.clone()];
            argv.extend(x.argv.iter().skip(1).cloned());
            self.push_exec(
                &x,
                argv,
                format!("{} has no shebang: run by /bin/sh", hit.path),
                true,
            );
        }
    }

    /// Queues a program start; `front` keeps a replacing exec ahead of other work.
    pub fn push_exec(&mut self, from: &Exec, argv: Vec<String>, reason: String, front: bool) {
        if from.depth + 1 > MAX_DEPTH {
            self.note(
                argv.first().map(String::as_str).unwrap_or(""),
                &format!("{reason}: deeper than {MAX_DEPTH} nested programs; not followed"),
            );
            return;
        }
        let x = Exec {
            argv,
            env: from.env.clone(),
            cwd: from.cwd.clone(),
            reason,
            depth: from.depth + 1,
        };
        if front {
            self.queue.push_front(x);
        } else {
            self.queue.push_back(x);
        }
    }

    /// The ELF header of a file (cached), `None` when not an ELF or unreadable.
    async fn header(&mut self, hit: &Hit) -> Option<Header> {
        if let Some(h) = self.headers.get(&hit.path) {
            return *h;
        }
        let b = self.read(hit, 0, elf::HEADER_LEN).await;
        let h = b.and_then(|b| elf::parse_header(&b).ok());
        self.headers.insert(hit.path.clone(), h);
        h
    }

    /// The ELF interpreter and DT_NEEDED closure of an executable or shared object.
    pub async fn elf_closure(&mut self, root: &Hit, why: &str) {
        // (object, how it was reached, DT_RPATH of its loaders when it has no RUNPATH)
        let mut work: VecDeque<(Hit, Vec<String>)> = VecDeque::new();
        if !self.elf_seen.insert(root.path.clone()) {
            return;
        }
        // A root loaded by dlopen (libjvm, NSS and SASL modules, ...) satisfies later
        // DT_NEEDED entries naming its soname, as the loader's list of loaded objects does.
        self.loaded.push(root.path.clone());
        work.push_back((root.clone(), Vec::new()));
        let mut objects = 0usize;
        while let Some((obj, inherited)) = work.pop_front() {
            objects += 1;
            if objects > MAX_OBJECTS {
                self.note(
                    &root.path,
                    &format!("more than {MAX_OBJECTS} shared objects; closure cut"),
                );
                return;
            }
            let info = match self.elf_info(&obj).await {
                Ok(i) => i,
                Err(e) => {
                    self.note(&obj.path, &format!("ELF not followed: {e}"));
                    continue;
                }
            };
            if self.abi.is_none() {
                self.abi = Some(info.header.abi());
            }
            if let Some(r) = &info.ranges {
                self.elf_ranges.insert(obj.path.clone(), r.clone());
            }
            if let Some(interp) = &info.interp {
                match self.resolve_file("/", interp) {
                    Ok(h) => {
                        self.add(
                            &h,
                            FileClass::Entrypoint,
                            &format!("PT_INTERP of {} ({why})", obj.path),
                        );
                        self.loaded.push(h.path.clone());
                        for f in ["/etc/ld.so.preload", "/etc/ld.so.cache"] {
                            if let Some(c) = self.try_file("/", f) {
                                self.add(&c, FileClass::Library, "read by the dynamic loader");
                            }
                        }
                    }
                    Err(e) => self.note(&obj.path, &format!("interpreter {interp}: {e}")),
                }
            }
            let origin = parent(&obj.path).to_string();
            // DT_RPATH applies to the object and what it loads, unless DT_RUNPATH is set.
            let mut rpath = Vec::new();
            if info.runpath.is_empty() {
                rpath.extend(info.rpath.iter().map(|d| (d.clone(), origin.clone())));
                rpath.extend(inherited.iter().map(|d| (d.clone(), String::new())));
            }
            for name in &info.needed {
                if self.loaded.iter().any(|l| basename(l) == name) {
                    continue;
                }
                match self
                    .find_library(name, &origin, &rpath, &info.runpath, info.header.abi())
                    .await
                {
                    Some(lib) => {
                        let reason = format!("DT_NEEDED {name} of {}", obj.path);
                        self.add(&lib, FileClass::Library, &reason);
                        self.loaded.push(format!("{}/{name}", parent(&lib.path)));
                        if self.elf_seen.insert(lib.path.clone()) {
                            let inh: Vec<String> = if info.runpath.is_empty() {
                                info.rpath
                                    .iter()
                                    .map(|d| {
                                        expand_origin(
                                            d,
                                            &origin,
                                            info.header.machine,
                                            info.header.is64,
                                        )
                                    })
                                    .chain(inherited.iter().cloned())
                                    .collect()
                            } else {
                                Vec::new()
                            };
                            work.push_back((lib, inh));
                        }
                    }
                    None => self.note(
                        &obj.path,
                        &format!("DT_NEEDED {name}: not found in the library search path"),
                    ),
                }
            }
        }
    }

    async fn elf_info(&mut self, obj: &Hit) -> Result<ElfInfo, String> {
        let head = self
            .read(obj, 0, elf::HEADER_LEN)
            .await
            .ok_or("unreadable")?;
        let header = elf::parse_header(&head).map_err(|e| e.to_string())?;
        self.headers.insert(obj.path.clone(), Some(header));
        let (off, len) = header.phdr_range();
        if off.checked_add(len).is_none_or(|e| e > obj.entry.size) {
            return Err(format!("program headers {off}+{len} lie outside the file"));
        }
        let ph = self.read(obj, off, len).await.ok_or("unreadable")?;
        let seg = elf::parse_phdrs(&header, &ph).map_err(|e| e.to_string())?;
        let interp = match seg.interp {
            Some((o, l)) => {
                let b = self.read(obj, o, l).await.ok_or("unreadable PT_INTERP")?;
                Some(elf::parse_interp(&b).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let mut info = ElfInfo {
            header,
            interp,
            needed: Vec::new(),
            rpath: Vec::new(),
            runpath: Vec::new(),
            ranges: None,
        };
        let Some((doff, dlen)) = seg.dynamic else {
            info.ranges = self.elf_ranges(obj, &header, &seg, None).await;
            return Ok(info); // static
        };
        let dy = self
            .read(obj, doff, dlen)
            .await
            .ok_or("unreadable dynamic section")?;
        let d = elf::parse_dynamic(&header, &dy);
        info.ranges = self.elf_ranges(obj, &header, &seg, Some(&d)).await;
        let Some(tab_off) = d.strtab_vaddr.and_then(|v| seg.file_offset(v)) else {
            return Err("no string table for the dynamic section".into());
        };
        // A small table is read whole; a large one (C++ libraries carry megabytes of
        // symbol names) only where the wanted strings are.
        let whole_tab = if d.strsz <= elf::MAX_STRTAB {
            Some(
                self.read(obj, tab_off, d.strsz)
                    .await
                    .ok_or("unreadable string table")?,
            )
        } else {
            None
        };
        let mut strings = Vec::with_capacity(d.needed.len() + 2);
        for o in d.needed.iter().chain(&d.rpath).chain(&d.runpath) {
            let s = match &whole_tab {
                Some(tab) => elf::strtab_str(tab, *o),
                None if *o < d.strsz => {
                    let len = (d.strsz - o).min(elf::MAX_DYN_STRING);
                    match tab_off.checked_add(*o) {
                        Some(at) => self
                            .read(obj, at, len)
                            .await
                            .and_then(|b| elf::strtab_str(&b, 0)),
                        None => None,
                    }
                }
                None => None,
            };
            if s.is_none() {
                self.note(
                    &obj.path,
                    &format!("dynamic string at offset {o} unreadable; entry skipped"),
                );
            }
            strings.push(s);
        }
        let n = d.needed.len();
        info.needed = strings.iter().take(n).flatten().cloned().collect();
        let split = |s: Option<&Option<String>>| -> Vec<String> {
            s.and_then(|s| s.as_deref())
                .map(|s| {
                    s.split(':')
                        .filter(|d| !d.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut rest = strings.iter().skip(n);
        if d.rpath.is_some() {
            info.rpath = split(rest.next());
        }
        if d.runpath.is_some() {
            info.runpath = split(rest.next());
        }
        Ok(info)
    }

    /// Byte ranges of big data files whose format says what a start reads: the JDK's
    /// module image ([`super::jimage`]).
    async fn data_ranges(&mut self) {
        let big: Vec<String> = self
            .files
            .iter()
            .filter(|f| f.size >= RANGES_MIN_SIZE && !self.elf_ranges.contains_key(&f.path))
            .filter(|f| basename(&f.path) == "modules")
            .map(|f| f.path.clone())
            .collect();
        for path in big {
            let Some(hit) = self.try_file("/", &path) else {
                continue;
            };
            let Some(b) = self.read(&hit, 0, jimage::HEADER_LEN).await else {
                continue;
            };
            let r = jimage::parse_header(&b).and_then(|h| jimage::ranges(&h, hit.entry.size));
            match r {
                Ok(r) => {
                    let r = r
                        .into_iter()
                        .map(|(offset, len)| ByteRange { offset, len })
                        .collect();
                    self.elf_ranges.insert(path, r);
                }
                Err(jimage::JimageError::NotJimage) => {}
                Err(e) => self.note(&path, &format!("planned whole: {e}")),
            }
        }
    }

    /// The byte ranges loading a big ELF object reads ([`elf::loader_ranges`]); `None`
    /// for a small file, or when the prediction covers most of the file anyway.
    async fn elf_ranges(
        &mut self,
        obj: &Hit,
        h: &Header,
        seg: &elf::Segments,
        d: Option<&elf::Dynamic>,
    ) -> Option<Vec<ByteRange>> {
        let size = obj.entry.size;
        if size < RANGES_MIN_SIZE {
            return None;
        }
        // Code that runs on every load, for a text too big to predict whole: the entry
        // point (programs), DT_INIT and the init arrays' functions.
        let mut code: Vec<u64> = Vec::new();
        let huge_text = seg
            .loads
            .iter()
            .any(|l| l.flags & elf::PF_X != 0 && l.filesz > elf::MAX_TEXT);
        if huge_text && h.entry != 0 {
            code.push(h.entry);
        }
        if let Some(d) = d.filter(|_| huge_text) {
            code.extend(d.tag(elf::DT_INIT));
            for (off, len) in d.init_arrays(seg, elf::MAX_INIT_ARRAY) {
                if let Some(b) = self.read(obj, off, len).await {
                    code.extend(elf::parse_init_array(h, &b));
                }
            }
        }
        code.sort_unstable();
        code.dedup();
        let ranges = elf::loader_ranges(h, seg, d, &code, size);
        let covered: u64 = ranges.iter().map(|r| r.1).sum();
        if covered.saturating_mul(100) >= size.saturating_mul(RANGES_MAX_SHARE) {
            return None;
        }
        Some(
            ranges
                .into_iter()
                .map(|(offset, len)| ByteRange { offset, len })
                .collect(),
        )
    }

    /// Searches a library as the glibc loader does: DT_RPATH (no RUNPATH), LD_LIBRARY_PATH,
    /// DT_RUNPATH, ld.so.conf (what ld.so.cache is built from), default directories.
    async fn find_library(
        &mut self,
        name: &str,
        origin: &str,
        rpath: &[(String, String)],
        runpath: &[String],
        abi: (bool, u16),
    ) -> Option<Hit> {
        let (is64, machine) = abi;
        if name.contains('/') {
            return self.resolve_file(origin, name).ok();
        }
        let mut dirs: Vec<String> = Vec::new();
        for (d, o) in rpath {
            // Inherited entries were expanded against their own object's origin already.
            dirs.push(if o.is_empty() {
                d.clone()
            } else {
                expand_origin(d, o, machine, is64)
            });
        }
        if let Some(llp) = self.env.get("LD_LIBRARY_PATH").cloned() {
            dirs.extend(
                llp.split([':', ';'])
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        }
        dirs.extend(
            runpath
                .iter()
                .map(|d| expand_origin(d, origin, machine, is64)),
        );
        dirs.extend(self.ld_conf_dirs().await);
        if let Some(t) = elf::multiarch(machine, is64) {
            dirs.push(format!("/lib/{t}"));
            dirs.push(format!("/usr/lib/{t}"));
        }
        if is64 {
            dirs.push("/lib64".into());
            dirs.push("/usr/lib64".into());
        }
        dirs.push("/lib".into());
        dirs.push("/usr/lib".into());
        let mut tried = HashSet::new();
        for d in dirs.into_iter().take(256) {
            if !tried.insert(d.clone()) {
                continue;
            }
            let cand = format!("{}/{name}", d.trim_end_matches('/'));
            let Some(hit) = self.try_file("/", &cand) else {
                continue;
            };
            // The loader skips libraries of another class or machine.
            match self.header(&hit).await {
                Some(h) if h.abi() == abi => return Some(hit),
                _ => continue,
            }
        }
        None
    }

    /// Directories from /etc/ld.so.conf and its includes (read once).
    pub async fn ld_conf_dirs(&mut self) -> Vec<String> {
        if let Some(d) = &self.ld_conf {
            return d.clone();
        }
        let mut dirs = Vec::new();
        let mut stack = vec!["/etc/ld.so.conf".to_string()];
        let mut seen = HashSet::new();
        while let Some(p) = stack.pop() {
            if seen.len() >= 64 || !seen.insert(p.clone()) {
                continue;
            }
            let Some(hit) = self.try_file("/", &p) else {
                continue;
            };
            // Read here to learn the search path; the loader itself reads only ld.so.cache,
            // so the file is not planned.
            let Some(b) = self.read(&hit, 0, 64 * 1024).await else {
                continue;
            };
            let text = String::from_utf8_lossy(&b).to_string();
            let mut includes = Vec::new();
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                if let Some(pat) = line.strip_prefix("include") {
                    for pat in pat.split_whitespace() {
                        let pat = lexical_join(parent(&hit.path), pat);
                        includes.extend(self.glob(&pat));
                    }
                } else if !line.is_empty() && !line.starts_with("hwcap") {
                    dirs.extend(
                        line.split([':', ',', ' ', '\t', '='])
                            .filter(|d| d.starts_with('/'))
                            .map(str::to_string),
                    );
                }
            }
            // Includes are read in order: push them reversed onto the stack.
            stack.extend(includes.into_iter().rev());
        }
        dirs.truncate(128);
        self.ld_conf = Some(dirs.clone());
        dirs
    }

    /// Paths matching a pattern whose last component may hold `*` and `?`.
    pub fn glob(&mut self, pattern: &str) -> Vec<String> {
        let dir = parent(pattern).to_string();
        let pat = basename(pattern);
        if !pat.contains(['*', '?']) {
            return vec![pattern.to_string()];
        }
        let Some(dir) = self.try_dir("/", &dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = resolve::list_dir(self.view, &dir, 4096)
            .into_iter()
            .filter(|n| wildcard(pat, n))
            .map(|n| format!("{}/{n}", dir.trim_end_matches('/')))
            .collect();
        out.sort();
        out
    }
}

#[derive(Debug)]
struct ElfInfo {
    header: Header,
    interp: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
    /// The ranges its loading reads, when planned in part.
    ranges: Option<Vec<ByteRange>>,
}

fn whole(size: u64) -> Vec<ByteRange> {
    vec![ByteRange {
        offset: 0,
        len: size,
    }]
}

/// `$ORIGIN`, `$LIB`, `$PLATFORM` (also `${...}`) in a search directory.
fn expand_origin(d: &str, origin: &str, machine: u16, is64: bool) -> String {
    let lib = if is64 { "lib64" } else { "lib" };
    d.replace("${ORIGIN}", origin)
        .replace("$ORIGIN", origin)
        .replace("${LIB}", lib)
        .replace("$LIB", lib)
        .replace("${PLATFORM}", elf::platform(machine))
        .replace("$PLATFORM", elf::platform(machine))
}

/// Shell-style wildcard match of one name (`*`, `?`), iterative (no backtracking blowup).
pub fn wildcard(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("*.conf", "libc.conf"));
        assert!(!wildcard("*.conf", "libc.conf.bak"));
        assert!(wildcard("lib?.so*", "libm.so.6"));
        assert!(wildcard("*", ""));
        assert!(!wildcard("a*b*c", "aXbY"));
    }

    #[test]
    fn origin_expansion() {
        assert_eq!(
            expand_origin("$ORIGIN/../lib", "/opt/app/bin", 62, true),
            "/opt/app/bin/../lib"
        );
        assert_eq!(
            expand_origin("/x/${LIB}/$PLATFORM", "/", 62, true),
            "/x/lib64/x86_64"
        );
    }
}
