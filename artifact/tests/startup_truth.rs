//! Ground truth for the startup analyzer: images built from Debian packages
//! (`hack/debian-images.sh`: a debootstrap minbase layer plus one layer of packages and app
//! files per image) start for real under `strace -f` in a chroot of their merged rootfs,
//! until ready; the files they open or execute are compared with the startup plan the
//! analyzer makes from the same layers (indexed by the real indexer, read through real
//! layer readers): recall and precision by files and by bytes. Prints a table
//! (`hack/startup-truth.sh` is the benchmark entry) and fails when byte recall < 95% or
//! byte precision < 60% on any image. At range granularity, the rootfs sits on a freshly
//! mounted ext4 filesystem (cold page cache, 128 KiB read-ahead) and the pages resident
//! after the start are compared with the plan's files whole and with its byte ranges
//! (printed, not asserted).
//!
//! Needs root (chroot, namespaces, debootstrap, loop mounts), strace, unshare, tar,
//! mkfs.ext4 and findmnt; a missing one is an error, never a skip.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use talaria_artifact::format::Knobs;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::reader::{LayerReader, MemorySpanCache, SpanCache};
use talaria_artifact::index::{Compression, EntryKind, LayerIndex};
use talaria_artifact::source::FileSource;
use talaria_artifact::startup::{self, ImageConfig, LayerFiles, PlanOptions, build_plan};
use talaria_artifact::view::MergedView;
use talaria_artifact::view::resolve::resolve;

/// Byte recall every image must reach (the issue's acceptance bar).
const MIN_BYTE_RECALL: f64 = 0.95;
/// Byte precision every image must reach.
const MIN_BYTE_PRECISION: f64 = 0.60;
/// Images of `hack/debian-images.sh`.
const IMAGES: &[&str] = &["python", "java", "node", "nginx", "shell"];
/// Longest a startup may take under strace before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// A listening server is ready once its trace has been quiet this long (its workers have
/// started)...
const QUIET: Duration = Duration::from_millis(1500);
/// ...or this long after it listened.
const SETTLE_MAX: Duration = Duration::from_secs(15);
/// Span cache of the analysis reads, as `talaria build` uses.
const ANALYSIS_CACHE_BYTES: u64 = 64 << 20;

/// Syscalls that read a file's data (or execute it) and that only look it up.
const TRACED: &str = "trace=execve,execveat,open,openat,openat2,creat,stat,lstat,newfstatat,\
                      statx,access,faccessat,faccessat2,readlink,readlinkat,chroot,listen";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn require_tools() {
    let root =
        Command::new("id").arg("-u").output().ok().map(|o| o.stdout) == Some(b"0\n".to_vec());
    assert!(
        root,
        "the startup ground truth needs root (chroot, namespaces, debootstrap)"
    );
    for t in [
        "strace",
        "unshare",
        "tar",
        "debootstrap",
        "mkfs.ext4",
        "findmnt",
        "mount",
    ] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{t} is required (hack/setup.sh installs it)");
    }
}

/// Builds the images once (cached; a warm run only checks) and returns their dir.
fn debian_images() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("hack/debian-images.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running hack/debian-images.sh");
    assert!(out.status.success(), "hack/debian-images.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().expect("the images dir").trim())
}

/// A layer indexed by the real indexer, with the blob it reads from.
struct Layer {
    blob: PathBuf,
    index: Arc<LayerIndex>,
}

fn index(blob: &Path) -> Layer {
    let f = std::fs::File::open(blob).expect("layer blob");
    let out = index_layer(
        BufReader::new(f),
        Compression::Gzip,
        &IndexOptions {
            span_size: Knobs::default().span_size,
        },
    )
    .unwrap_or_else(|e| panic!("indexing {}: {e}", blob.display()));
    Layer {
        blob: blob.to_path_buf(),
        index: Arc::new(out.index),
    }
}

/// What the analyzer predicted: the plan's files with their sizes.
struct Prediction {
    files: BTreeMap<String, u64>,
    /// The byte ranges the plan fetches of each of its files.
    ranges: BTreeMap<String, Ranges>,
    reasons: BTreeMap<String, String>,
    analysis: Duration,
    /// Of which building the merged view.
    view: Duration,
    /// Uncompressed span bytes the analysis inflated and verified (what its reads cost).
    inflated: u64,
    bytes_read: u64,
    notes: Vec<String>,
}

/// The analyzer's part of `talaria build`: merged view, analysis through ranged reads of the
/// layer blobs, plan within the default budget. Timed (indexing is not part of it).
async fn predict(layers: &[&Layer], config: &ImageConfig) -> (Prediction, MergedView) {
    let t0 = Instant::now();
    let refs: Vec<Option<&LayerIndex>> = layers.iter().map(|l| Some(l.index.as_ref())).collect();
    let view = MergedView::new(&refs);
    let view_time = t0.elapsed();
    let spans = Arc::new(MemorySpanCache::new(ANALYSIS_CACHE_BYTES));
    let cache: Arc<dyn SpanCache> = spans.clone();
    let readers = layers
        .iter()
        .map(|l| {
            let src = FileSource::open(&l.blob).expect("layer blob");
            Some(Arc::new(LayerReader::new(
                l.index.clone(),
                Arc::new(src),
                cache.clone(),
            )))
        })
        .collect();
    let files = LayerFiles { layers: readers };
    let analysis = startup::analyze(config, &view, &files).await;
    let plan = build_plan(
        &analysis,
        &refs,
        &PlanOptions {
            profile: "startup-local-v1".into(),
            version: 1,
            budget: Knobs::default().prefetch_budget,
        },
    );
    let elapsed = t0.elapsed();
    let inflated = spans.size();
    let size: HashMap<&str, u64> = analysis
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    let reasons = analysis
        .files
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                f.reasons.first().cloned().unwrap_or_default(),
            )
        })
        .collect();
    let files = plan
        .entries
        .iter()
        .map(|e| {
            (
                e.path.clone(),
                size.get(e.path.as_str()).copied().unwrap_or(0),
            )
        })
        .collect();
    let planned: BTreeSet<&str> = plan.entries.iter().map(|e| e.path.as_str()).collect();
    let ranges = analysis
        .files
        .iter()
        .filter(|f| planned.contains(f.path.as_str()))
        .map(|f| {
            let mut r: Ranges = f.ranges.iter().map(|r| (r.offset, r.len)).collect();
            r.sort_unstable();
            (f.path.clone(), r)
        })
        .collect();
    let p = Prediction {
        files,
        ranges,
        reasons,
        analysis: elapsed,
        view: view_time,
        inflated,
        bytes_read: analysis.bytes_read,
        notes: analysis
            .notes
            .iter()
            .map(|n| format!("{}: {}", n.subject, n.message))
            .collect(),
    };
    (p, view)
}

/// Unpacks the layers into `root` as a container runtime would: each layer's whiteouts
/// (`.wh.<name>`, `.wh..wh..opq`) remove what lower layers put there, then its files land.
fn materialize(blobs: &[&Path], root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    for blob in blobs {
        let list = Command::new("tar")
            .arg("-tzf")
            .arg(blob)
            .output()
            .expect("tar -t");
        assert!(list.status.success(), "listing {}", blob.display());
        let mut markers = Vec::new();
        for name in String::from_utf8_lossy(&list.stdout).lines() {
            let rel = name.trim_start_matches("./").trim_end_matches('/');
            let (dir, base) = rel.rsplit_once('/').unwrap_or(("", rel));
            if base == ".wh..wh..opq" {
                if let Ok(rd) = std::fs::read_dir(root.join(dir)) {
                    for e in rd.flatten() {
                        remove(&e.path());
                    }
                }
                markers.push(rel.to_string());
            } else if let Some(victim) = base.strip_prefix(".wh.") {
                remove(&root.join(dir).join(victim));
                markers.push(rel.to_string());
            }
        }
        let st = Command::new("tar")
            .args(["-xzpf"])
            .arg(blob)
            .args(["--numeric-owner", "-C"])
            .arg(root)
            .status()
            .expect("tar -x");
        assert!(st.success(), "unpacking {}", blob.display());
        for m in markers {
            let _ = std::fs::remove_file(root.join(m));
        }
    }
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).unwrap(),
        Ok(_) => std::fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// How the harness knows a startup is over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ready {
    /// The program exits with status 0.
    Exit,
    /// A socket is listening (then the trace settles: workers started).
    Listen,
}

/// Starts the image's process in a chroot of `root` under `strace -f`, in fresh mount, PID
/// and network namespaces (its own /proc and /dev, no host ports; everything dies with
/// the namespace), and returns the trace once it is ready.
fn run_traced(root: &Path, config: &ImageConfig, ready: Ready, trace: &Path) -> String {
    let wd = if config.working_dir.is_empty() {
        "/".to_string()
    } else {
        config.working_dir.clone()
    };
    // `unshare --root/--wd` does the chroot and chdir, then execvp's the command with the
    // image's PATH: the trace starts at its chroot() and shows the same lookups a runtime
    // makes. The outer shell only mounts; strace becomes the namespace's init.
    let script = r#"set -e
root=$1 trace=$2 wd=$3 traced=$4; shift 4
mount --make-rprivate /
mount -t proc proc /proc
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
ip link set lo up 2>/dev/null || true
exec strace -f -qq -y -e "$traced" -o "$trace" unshare --root="$root" --wd="$wd" -- "$@""#;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child=SIGTERM",
            "--",
            "/bin/sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .arg(trace)
        .arg(&wd)
        .arg(TRACED)
        .args(config.argv())
        .env_clear()
        // The host tools run with the host PATH; the image process gets the image's env
        // (unshare passes it on, and execvp searches the image's PATH).
        .envs(config.env.iter().filter_map(|kv| kv.split_once('=')))
        .env("PATH", path_for(config))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting unshare");
    let t0 = Instant::now();
    match ready {
        Ready::Exit => loop {
            if let Some(st) = child.try_wait().expect("waiting") {
                let out = child.wait_with_output().expect("output");
                assert!(
                    st.success(),
                    "the real startup failed ({st}): {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                break;
            }
            assert!(t0.elapsed() < START_TIMEOUT, "startup did not exit in time");
            std::thread::sleep(Duration::from_millis(50));
        },
        Ready::Listen => {
            let mut listened: Option<Instant> = None;
            let mut last = (0u64, Instant::now());
            loop {
                if let Ok(Some(st)) = child.try_wait() {
                    let out = child.wait_with_output().expect("output");
                    panic!(
                        "the server exited before it was ready ({st}): {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let len = std::fs::metadata(trace).map(|m| m.len()).unwrap_or(0);
                if len != last.0 {
                    last = (len, Instant::now());
                }
                if listened.is_none()
                    && std::fs::read_to_string(trace)
                        .unwrap_or_default()
                        .lines()
                        .any(|l| l.contains(" listen(") && l.ends_with(" = 0"))
                {
                    listened = Some(Instant::now());
                }
                if let Some(t) = listened
                    && (last.1.elapsed() >= QUIET || t.elapsed() >= SETTLE_MAX)
                {
                    break;
                }
                assert!(
                    t0.elapsed() < START_TIMEOUT,
                    "server did not listen in time"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            stop_namespace(&mut child);
        }
    }
    std::fs::read_to_string(trace).expect("the trace")
}

/// Ends a started server's namespace. strace is its init (PID 1): SIGTERM lets it flush the
/// trace, but it may stay (with the server) waiting for its tracees, so it gets SIGKILL
/// after a grace period, which takes the whole PID namespace with it; then the outer
/// unshare. (Killing only the unshare left strace and the server running, holding the
/// rootfs mount.)
fn stop_namespace(child: &mut std::process::Child) {
    let outer = child.id();
    let init: Option<i32> = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
    if let Some(pid) = init {
        // SAFETY: kill(2) on the pid of our own grandchild, read just now from /proc; it
        // cannot be reused while its parent (the unshare we have not waited for) lives.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// PATH for the host side (mount, strace, unshare) followed by the image's.
fn path_for(config: &ImageConfig) -> String {
    let image = config.env_var("PATH").unwrap_or(startup::DEFAULT_PATH);
    format!("/usr/sbin:/usr/bin:/sbin:/bin:{image}")
}

/// A file lookup the trace saw, by kind.
#[derive(Debug, Default)]
struct Traced {
    /// Opened for reading, or executed (paths inside the image).
    read: Vec<String>,
    /// Executed (their interpreters are read by the kernel, without an open).
    exec: Vec<String>,
    /// Only looked up (stat, access, readlink).
    looked_up: Vec<String>,
}

/// The syscalls after the chroot, from `strace -f -y` output (`unfinished`/`resumed`
/// pairs joined per pid). Paths come from the fd strace shows for a successful open (the
/// kernel's canonical path, under `host_root`), else from the argument, relative to the
/// dirfd or `cwd`.
fn parse_trace(trace: &str, host_root: &str, cwd: &str) -> Traced {
    let mut t = Traced::default();
    let mut chrooted = false;
    let mut pending: HashMap<&str, String> = HashMap::new();
    let in_image = |p: &str| -> Option<String> {
        let rest = p.strip_prefix(host_root)?;
        (rest.is_empty() || rest.starts_with('/')).then(|| format!("/{}", rest.trim_matches('/')))
    };
    for line in trace.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        let call: String = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = r.split_once("resumed>") else {
                continue;
            };
            match pending.remove(pid) {
                Some(head) => format!("{head}{tail}"),
                None => continue,
            }
        } else if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid, head.trim_end().to_string());
            continue;
        } else {
            rest.to_string()
        };
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        let Some((_, ret)) = call.rsplit_once(") = ") else {
            continue;
        };
        let ok = !ret.starts_with('-') && !ret.starts_with('?');
        if name == "chroot" {
            chrooted |= ok;
            continue;
        }
        if !chrooted || !ok {
            continue;
        }
        let at = matches!(
            name,
            "openat"
                | "openat2"
                | "newfstatat"
                | "statx"
                | "faccessat"
                | "faccessat2"
                | "readlinkat"
                | "execveat"
        );
        let (dirfd, path_arg) = if at {
            let (d, r) = args.split_once(", ").unwrap_or(("", args));
            (Some(d), r)
        } else {
            (None, args)
        };
        let Some(arg) = quoted(path_arg) else {
            continue;
        };
        let from_arg = || -> Option<String> {
            if arg.starts_with('/') {
                return Some(arg.clone());
            }
            if arg.is_empty() {
                return None; // AT_EMPTY_PATH: the fd itself
            }
            let base = match dirfd.and_then(fd_path) {
                Some(h) => in_image(&h)?,
                None => cwd.to_string(),
            };
            Some(format!("{}/{arg}", base.trim_end_matches('/')))
        };
        match name {
            "execve" | "execveat" => {
                if let Some(p) = from_arg() {
                    t.exec.push(p.clone());
                    t.read.push(p);
                }
            }
            "open" | "openat" | "openat2" | "creat" => {
                if name == "creat" || args.contains("O_WRONLY") {
                    continue;
                }
                let p = fd_path(ret).and_then(|h| in_image(&h)).or_else(from_arg);
                if let Some(p) = p {
                    t.read.push(p);
                }
            }
            "listen" => {}
            _ => {
                if let Some(p) = from_arg() {
                    t.looked_up.push(p);
                }
            }
        }
    }
    t
}

/// The path strace -y prints after a file descriptor: `3</usr/lib/x.so>`.
fn fd_path(s: &str) -> Option<String> {
    let s = s.trim();
    let a = s.find('<')?;
    if !s[..a].chars().all(|c| c.is_ascii_digit()) || a == 0 {
        return None;
    }
    let inner = &s[a + 1..];
    let b = inner.find('>')?;
    Some(inner[..b].to_string())
}

/// The first C string argument strace printed (escapes decoded).
fn quoted(s: &str) -> Option<String> {
    let start = s.find('"')?;
    let mut out = Vec::new();
    let mut it = s[start + 1..].bytes();
    while let Some(c) = it.next() {
        match c {
            b'"' => return Some(String::from_utf8_lossy(&out).to_string()),
            b'\\' => match it.next()? {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'x' => {
                    let h = [it.next()?, it.next()?];
                    out.push(u8::from_str_radix(std::str::from_utf8(&h).ok()?, 16).ok()?);
                }
                d @ b'0'..=b'7' => {
                    // Up to three octal digits; strace writes all three when a digit follows.
                    let mut v = u32::from(d - b'0');
                    let rest = it.clone().take(2).collect::<Vec<u8>>();
                    for &r in &rest {
                        if (b'0'..=b'7').contains(&r) {
                            v = v * 8 + u32::from(r - b'0');
                            it.next();
                        } else {
                            break;
                        }
                    }
                    out.push(u8::try_from(v).ok()?);
                }
                o => out.push(o),
            },
            c => out.push(c),
        }
    }
    None
}

/// Files the kernel reads for an exec without an `open` the trace shows: the shebang
/// interpreter and the ELF interpreter (from `readelf`, not from the analyzer's code).
fn kernel_reads(root: &Path, exe: &str, out: &mut Vec<String>, depth: usize) {
    if depth > 4 {
        return;
    }
    let host = root.join(exe.trim_start_matches('/'));
    let Ok(head) = std::fs::read(&host).map(|b| b[..b.len().min(256)].to_vec()) else {
        return;
    };
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = String::from_utf8_lossy(rest);
        let line = line.lines().next().unwrap_or("").trim();
        if let Some(interp) = line.split_whitespace().next() {
            out.push(interp.to_string());
            kernel_reads(root, interp, out, depth + 1);
        }
    } else if head.starts_with(b"\x7fELF") {
        // Absolute links inside the rootfs point at the host: resolve them in the image.
        let real = chroot_canonical(root, exe);
        let o = Command::new("readelf")
            .arg("-lW")
            .arg(root.join(real.trim_start_matches('/')))
            .output();
        let text = o
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if let Some(i) = text.find("program interpreter: ") {
            let rest = &text[i + "program interpreter: ".len()..];
            if let Some(end) = rest.find(']') {
                out.push(rest[..end].to_string());
            }
        }
    }
}

/// The canonical path of `p` inside the rootfs at `root` (links resolved against `root`).
fn chroot_canonical(root: &Path, p: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut todo: Vec<String> = p.split('/').rev().map(str::to_string).collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => {
                let cur = root.join(parts.join("/")).join(&c);
                match std::fs::read_link(&cur) {
                    Ok(t) if hops < 40 => {
                        hops += 1;
                        let t = t.to_string_lossy().to_string();
                        if t.starts_with('/') {
                            parts.clear();
                        }
                        todo.extend(t.split('/').rev().map(str::to_string));
                    }
                    _ => parts.push(c),
                }
            }
        }
    }
    format!("/{}", parts.join("/"))
}

/// Byte ranges `(offset, len)`, sorted and disjoint.
type Ranges = Vec<(u64, u64)>;

/// Read-ahead of the cold filesystem's device, in KiB (the kernel's default, as the node's
/// FUSE filesystem has).
const READ_AHEAD_KB: u64 = 128;
/// Size of the sparse image file of a [`ColdFs`].
const COLD_FS_BYTES: u64 = 6 << 30;

/// A fresh ext4 filesystem on a loop device, mounted at `root`. The rootfs is unpacked
/// there, then the filesystem is remounted: unmounting evicts its page cache, so the start
/// reads every page from the "disk" and the page-cache residency afterwards shows what it
/// read, with the kernel's read-ahead and fault read-around: the ranges a lazily fetched
/// filesystem would be asked for. (The loop device's backing file stays cached by the host
/// filesystem; that makes the reads fast, not visible to the ext4 page cache.)
struct ColdFs {
    img: PathBuf,
    root: PathBuf,
}

impl ColdFs {
    fn new(work: &Path, root: &Path) -> ColdFs {
        std::fs::create_dir_all(root).unwrap();
        let img = work.join("rootfs.ext4");
        let f = std::fs::File::create(&img).expect("rootfs image");
        f.set_len(COLD_FS_BYTES).expect("sizing the rootfs image");
        drop(f);
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1"])
            .arg(&img));
        let fs = ColdFs {
            img,
            root: root.to_path_buf(),
        };
        fs.mount();
        fs
    }

    fn mount(&self) {
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.img)
            .arg(&self.root));
        // Loop devices inherit a large read-ahead from their backing file's device (MiBs
        // here); the node's FUSE filesystem keeps the kernel's default, 128 KiB, which is
        // also the read-around of a page fault.
        let src = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--mountpoint"])
            .arg(&self.root)
            .output()
            .expect("findmnt");
        let dev = String::from_utf8_lossy(&src.stdout).trim().to_string();
        let name = dev.rsplit('/').next().unwrap_or_default().to_string();
        assert!(name.starts_with("loop"), "rootfs mounted from {dev:?}");
        std::fs::write(
            format!("/sys/block/{name}/queue/read_ahead_kb"),
            format!("{READ_AHEAD_KB}\n"),
        )
        .expect("setting the loop device's read-ahead");
    }

    fn remount(&self) {
        sh(Command::new("umount").arg(&self.root));
        self.mount();
    }
}

impl Drop for ColdFs {
    fn drop(&mut self) {
        // The loop device goes with the mount (autoclear). A namespace that still holds
        // the mount goes away within moments; past that, detach lazily.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(&self.root)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.root).status();
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("running a setup command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pages of a file in the page cache, as byte ranges within `size` (mincore of a
/// mapping that is never touched: it reads nothing).
fn resident(path: &Path, size: u64) -> Ranges {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(len) = usize::try_from(size) else {
        return Vec::new();
    };
    if len == 0 {
        return Vec::new();
    }
    // SAFETY: a fresh read-only shared mapping of an open file, never dereferenced; mincore
    // writes one byte per page into a vector of that many bytes; the mapping is unmapped
    // before returning.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let pages = usize::try_from(size.div_ceil(page)).unwrap();
    let mut vec = vec![0u8; pages];
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Vec::new();
        }
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        if rc != 0 {
            return Vec::new();
        }
    }
    let mut out: Ranges = Vec::new();
    for (i, v) in vec.iter().enumerate() {
        if v & 1 == 0 {
            continue;
        }
        let off = i as u64 * page;
        let len = page.min(size - off);
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Regular files of the rootfs at `root` with pages in the page cache (image path →
/// resident ranges). Files changed since `since` are left out: the start wrote them.
fn resident_files(root: &Path, since: std::time::SystemTime) -> BTreeMap<String, Ranges> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let r = format!("{rel}/{name}");
            if depth == 0 && matches!(name.as_str(), "proc" | "dev" | "sys" | "lost+found") {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() && depth < 64 {
                stack.push((e.path(), r, depth + 1));
            } else if m.is_file() && m.len() > 0 && m.modified().is_ok_and(|t| t < since) {
                let res = resident(&e.path(), m.len());
                if !res.is_empty() {
                    out.insert(r, res);
                }
            }
        }
    }
    out
}

/// Bytes of `a` also in `b` (both sorted and disjoint).
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let (s1, e1) = (a[i].0, a[i].0 + a[i].1);
        let (s2, e2) = (b[j].0, b[j].0 + b[j].1);
        let (s, e) = (s1.max(s2), e1.min(e2));
        if s < e {
            n += e - s;
        }
        if e1 < e2 {
            i += 1;
        } else {
            j += 1;
        }
    }
    n
}

/// Range-level comparison: the bytes in the page cache after a cold start against the
/// whole-file plan (every planned file whole: "before") and the plan's ranges ("after").
#[derive(Default)]
struct RangeRow {
    /// Bytes resident after the start, in all files of the image.
    truth: u64,
    whole_pred: u64,
    whole_hit: u64,
    range_pred: u64,
    range_hit: u64,
    /// Files planned in part: path, size, resident, predicted, hit.
    partial: Vec<(String, u64, u64, u64, u64)>,
    /// Resident files planned whole that the start read least of: path, size, resident.
    sparse: Vec<(String, u64, u64)>,
}

fn range_row(pred: &Prediction, resident: &BTreeMap<String, Ranges>) -> RangeRow {
    let mut row = RangeRow {
        truth: resident.values().flatten().map(|r| r.1).sum(),
        ..RangeRow::default()
    };
    for (path, ranges) in &pred.ranges {
        let size = pred.files.get(path).copied().unwrap_or(0);
        let truth = resident.get(path).map(Vec::as_slice).unwrap_or_default();
        let t: u64 = truth.iter().map(|r| r.1).sum();
        let whole = [(0, size)];
        row.whole_pred += size;
        row.whole_hit += overlap(truth, &whole);
        let p: u64 = ranges.iter().map(|r| r.1).sum();
        let h = overlap(truth, ranges);
        row.range_pred += p;
        row.range_hit += h;
        if p < size {
            row.partial.push((path.clone(), size, t, p, h));
        } else if size >= 1 << 20 {
            row.sparse.push((path.clone(), size, t));
        }
    }
    row.partial.sort_by_key(|f| std::cmp::Reverse(f.1));
    row.sparse.sort_by_key(|f| std::cmp::Reverse(f.1 - f.2));
    row
}

#[derive(Default)]
struct Row {
    name: String,
    truth_files: usize,
    looked_up_only: usize,
    predicted_files: usize,
    hit_files: usize,
    truth_bytes: u64,
    predicted_bytes: u64,
    hit_bytes: u64,
    analysis: Duration,
    view: Duration,
    inflated: u64,
    analysis_read: u64,
    notes: Vec<String>,
    missed: Vec<(String, u64)>,
    extra: Vec<(String, u64, String)>,
    ranges: RangeRow,
}

impl Row {
    fn ratio(a: u64, b: u64) -> f64 {
        if b == 0 { 1.0 } else { a as f64 / b as f64 }
    }
    fn file_recall(&self) -> f64 {
        Self::ratio(self.hit_files as u64, self.truth_files as u64)
    }
    fn file_precision(&self) -> f64 {
        Self::ratio(self.hit_files as u64, self.predicted_files as u64)
    }
    fn byte_recall(&self) -> f64 {
        Self::ratio(self.hit_bytes, self.truth_bytes)
    }
    fn byte_precision(&self) -> f64 {
        Self::ratio(self.hit_bytes, self.predicted_bytes)
    }
}

/// Regular files of the image (canonical path → size) among `paths`.
/// Empty files are left out: they hold no bytes to fetch (their entry is in the index).
fn image_files(view: &MergedView, paths: &[String]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in paths {
        if let Ok(r) = resolve(view, "/", p, true)
            && let Some((_, e)) = r.found
            && e.kind == EntryKind::File
            && e.size > 0
        {
            out.insert(r.path.clone(), e.size);
        }
    }
    out
}

async fn run(name: &str, dir: &Path, base: &Layer, scratch: &Path) -> Row {
    let img = dir.join(name);
    let config = ImageConfig::from_json(&std::fs::read(img.join("config.json")).unwrap())
        .expect("image config");
    let ready = match std::fs::read_to_string(img.join("ready")).unwrap().trim() {
        "listen" => Ready::Listen,
        _ => Ready::Exit,
    };
    let top = index(&img.join("layer.tar.gz"));
    let (pred, view) = predict(&[base, &top], &config).await;

    let work = scratch.join(name);
    let _ = std::fs::remove_dir_all(&work);
    let root = work.join("root");
    let fs = ColdFs::new(&work, &root);
    materialize(&[&base.blob, &top.blob], &root);
    fs.remount();
    let started = std::time::SystemTime::now();
    let trace_file = work.join("trace");
    let trace = run_traced(&root, &config, ready, &trace_file);
    // Before anything here reads the rootfs (the kernel_reads below do).
    let resident = resident_files(&root, started);
    if let Some(d) = std::env::var_os("TALARIA_TRUTH_DUMP") {
        // Resident ranges and planned ranges per file, for tuning the predictions.
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).unwrap();
        let doc = serde_json::json!({ "resident": &resident, "planned": &pred.ranges });
        std::fs::write(d.join(format!("{name}.json")), doc.to_string()).unwrap();
    }
    let ranges = range_row(&pred, &resident);
    let cwd = if config.working_dir.is_empty() {
        "/"
    } else {
        &config.working_dir
    };
    let host_root = root.canonicalize().unwrap().to_string_lossy().to_string();
    let mut t = parse_trace(&trace, &host_root, cwd);
    for e in t.exec.clone() {
        kernel_reads(&root, &e, &mut t.read, 0);
    }
    let truth = image_files(&view, &t.read);
    let looked_up = image_files(&view, &t.looked_up);
    drop(fs);
    let _ = std::fs::remove_dir_all(&work);

    let hit: BTreeSet<&String> = truth
        .keys()
        .filter(|k| pred.files.contains_key(*k))
        .collect();
    let mut missed: Vec<(String, u64)> = truth
        .iter()
        .filter(|(k, _)| !pred.files.contains_key(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    missed.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
    let mut extra: Vec<(String, u64, String)> = pred
        .files
        .iter()
        .filter(|(k, _)| !truth.contains_key(*k))
        .map(|(k, v)| {
            (
                k.clone(),
                *v,
                pred.reasons.get(k).cloned().unwrap_or_default(),
            )
        })
        .collect();
    extra.sort_by_key(|(_, s, _)| std::cmp::Reverse(*s));
    Row {
        name: name.to_string(),
        truth_files: truth.len(),
        looked_up_only: looked_up.keys().filter(|k| !truth.contains_key(*k)).count(),
        predicted_files: pred.files.len(),
        hit_files: hit.len(),
        truth_bytes: truth.values().sum(),
        predicted_bytes: pred.files.values().sum(),
        hit_bytes: hit.iter().map(|k| truth[*k]).sum(),
        analysis: pred.analysis,
        view: pred.view,
        inflated: pred.inflated,
        analysis_read: pred.bytes_read,
        notes: pred.notes,
        missed,
        extra,
        ranges,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_plans_against_real_debian_startups() {
    require_tools();
    let t0 = Instant::now();
    let dir = debian_images();
    let images_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let base = index(&dir.join("base.tar.gz"));
    let index_s = t1.elapsed().as_secs_f64();
    let scratch = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for name in IMAGES {
        rows.push(run(name, &dir, &base, scratch.path()).await);
    }
    println!(
        "\nimages: {} (ready in {images_s:.1}s{}); base layer indexed in {index_s:.1}s",
        dir.display(),
        std::fs::read_to_string(dir.join("build-seconds"))
            .map(|s| format!(", built cold in {}s", s.trim()))
            .unwrap_or_default()
    );
    report(&rows);
}

fn report(rows: &[Row]) {
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "\n{:<8} {:>6} {:>6} {:>6} {:>8} {:>8} {:>11} {:>11} {:>8} {:>8} {:>10}",
        "image",
        "truth",
        "stat",
        "pred",
        "f-recall",
        "f-prec",
        "truth-B",
        "pred-B",
        "b-recall",
        "b-prec",
        format!("analysis({build})"),
    );
    for r in rows {
        println!(
            "{:<8} {:>6} {:>6} {:>6} {:>7.1}% {:>7.1}% {:>11} {:>11} {:>7.1}% {:>7.1}% {:>10.0}ms",
            r.name,
            r.truth_files,
            r.looked_up_only,
            r.predicted_files,
            r.file_recall() * 100.0,
            r.file_precision() * 100.0,
            r.truth_bytes,
            r.predicted_bytes,
            r.byte_recall() * 100.0,
            r.byte_precision() * 100.0,
            r.analysis.as_secs_f64() * 1000.0,
        );
    }
    println!(
        "(truth: files opened for reading or executed; stat: files only looked up, not counted; \
         analysis: merged view + analysis + plan, {build} build)"
    );
    let pct = |a: u64, b: u64| Row::ratio(a, b) * 100.0;
    println!(
        "\nranges (truth: page cache after a cold start from a fresh filesystem, read-ahead \
         included):\n{:<8} {:>11} | {:>11} {:>8} {:>8} | {:>11} {:>8} {:>8}",
        "image", "resident-B", "whole-B", "recall", "prec", "ranges-B", "recall", "prec",
    );
    for r in rows {
        let g = &r.ranges;
        println!(
            "{:<8} {:>11} | {:>11} {:>7.1}% {:>7.1}% | {:>11} {:>7.1}% {:>7.1}%",
            r.name,
            g.truth,
            g.whole_pred,
            pct(g.whole_hit, g.truth),
            pct(g.whole_hit, g.whole_pred),
            g.range_pred,
            pct(g.range_hit, g.truth),
            pct(g.range_hit, g.range_pred),
        );
    }
    println!("(whole: every planned file whole, as before ranges; ranges: the plan's ranges)");
    for r in rows {
        for (p, size, t, pr, h) in &r.ranges.partial {
            println!(
                "    {}: in part: {p}: {size} bytes, resident {t}, planned {pr}, hit {h}",
                r.name
            );
        }
        for (p, size, t) in r.ranges.sparse.iter().take(5) {
            println!("    {}: whole:   {p}: {size} bytes, resident {t}", r.name);
        }
    }
    for r in rows {
        println!(
            "\n{}: analysis read {} bytes of the image ({} MiB of spans inflated), merged view \
             {:.0}ms, {} notes",
            r.name,
            r.analysis_read,
            r.inflated >> 20,
            r.view.as_secs_f64() * 1000.0,
            r.notes.len()
        );
        for n in r.notes.iter().take(10) {
            println!("    note:     {n}");
        }
        for (p, s) in r.missed.iter().take(25) {
            println!("    missed:   {p} ({s} bytes)");
        }
        if r.missed.len() > 25 {
            println!("    missed:   ... {} more", r.missed.len() - 25);
        }
        for (p, s, why) in r.extra.iter().take(25) {
            println!("    not read: {p} ({s} bytes; {why})");
        }
        if r.extra.len() > 25 {
            println!("    not read: ... {} more", r.extra.len() - 25);
        }
    }
    for r in rows {
        assert!(r.truth_files > 0, "{}: the trace saw no image file", r.name);
        assert!(
            r.byte_recall() >= MIN_BYTE_RECALL,
            "{}: byte recall {:.3} < {MIN_BYTE_RECALL}",
            r.name,
            r.byte_recall()
        );
        assert!(
            r.byte_precision() >= MIN_BYTE_PRECISION,
            "{}: byte precision {:.3} < {MIN_BYTE_PRECISION}",
            r.name,
            r.byte_precision()
        );
    }
}

#[test]
fn trace_parsing() {
    let trace = r#"100 openat(AT_FDCWD</>, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3</host/etc/ld.so.cache>
100 chroot("/r") = 0
100 execve("/usr/local/bin/x", ["x"], 0x7ffd /* 3 vars */) = -1 ENOENT (No such file or directory)
100 execve("/usr/bin/x", ["x"], 0x7ffd /* 3 vars */) = 0
100 openat(AT_FDCWD</r/app>, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3</r/etc/ld.so.cache>
101 openat(AT_FDCWD</r/app>, "lib/a.js", O_RDONLY|O_CLOEXEC <unfinished ...>
100 newfstatat(3</r/usr/lib>, "b.so", {st_mode=S_IFREG|0644, st_size=1, ...}, 0) = 0
101 <... openat resumed>) = 4</r/app/lib/a.js>
100 openat(AT_FDCWD</r/app>, "/var/log/x.log", O_WRONLY|O_CREAT|O_APPEND, 0644) = 5</r/var/log/x.log>
100 openat(AT_FDCWD</r/app>, "rel\"q\303\251", O_RDONLY) = -1 ENOENT (No such file or directory)
100 access("/etc/x", R_OK) = 0
100 +++ exited with 0 +++
"#;
    let t = parse_trace(trace, "/r", "/app");
    assert_eq!(t.read, ["/usr/bin/x", "/etc/ld.so.cache", "/app/lib/a.js"]);
    assert_eq!(t.exec, ["/usr/bin/x"]);
    assert_eq!(t.looked_up, ["/usr/lib/b.so", "/etc/x"]);
    assert_eq!(quoted(r#"x, "a\"b\303\251\n""#).as_deref(), Some("a\"bé\n"));
    assert_eq!(fd_path("3</a b/c>"), Some("/a b/c".into()));
}
