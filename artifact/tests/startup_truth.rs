//! Ground truth for the startup analyzer: real startups of images made from this machine's
//! files, run under `strace -f` in a chroot of the image's rootfs; the files they open or
//! execute are compared with the analyzer's prediction (recall and precision, by files and
//! by bytes). Prints a table (`hack/startup-truth.sh` runs it) and fails when recall drops
//! below the bar. Needs root, strace and chroot; skipped (with a message) otherwise.

mod startup_common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::time::Instant;

use startup_common::{HostTree, TestImage, config};
use talaria_artifact::index::EntryKind;
use talaria_artifact::startup::{ImageConfig, resolve::resolve};

/// Byte recall every scenario must reach (the acceptance bar).
const MIN_BYTE_RECALL: f64 = 0.95;
/// Byte precision every scenario must reach.
const MIN_BYTE_PRECISION: f64 = 0.60;

const LIBDIR: &str = "/lib/x86_64-linux-gnu";

struct Scenario {
    name: &'static str,
    tree: HostTree,
    config: ImageConfig,
}

fn base(libs: &[&str], bins: &[&str]) -> HostTree {
    let mut t = HostTree::default();
    for f in [
        "/lib64/ld-linux-x86-64.so.2",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d/libc.conf",
        "/etc/ld.so.conf.d/x86_64-linux-gnu.conf",
        "/etc/ld.so.cache",
    ] {
        t.add(f);
    }
    for l in libs.iter().chain(["libc.so.6"].iter()) {
        t.add(&format!("{LIBDIR}/{l}"));
    }
    for b in bins {
        t.add(b);
    }
    t
}

fn scenarios() -> Vec<Scenario> {
    let mut shell = base(
        &["libtinfo.so.6", "libselinux.so.1", "libpcre2-8.so.0"],
        &["/bin/bash", "/bin/ls"],
    );
    shell.dir("app").data(
        "app/run.sh",
        "#!/bin/bash\nset -e\nexport GREETING=hi\nexec ls /app\n",
        0o755,
    );
    let mut perl = base(
        &["libm.so.6", "libcrypt.so.1"],
        &["/usr/bin/env", "/usr/bin/perl"],
    );
    perl.dir("app").data(
        "app/hello.pl",
        "#!/usr/bin/env perl\nprint \"hello\\n\";\n",
        0o755,
    );
    let mut py = base(
        &["libm.so.6", "libz.so.1", "libexpat.so.1"],
        &["/usr/bin/python3.11", "/usr/bin/python3"],
    );
    py.add_tree(
        "/usr/lib/python3.11",
        &[
            "test",
            "idlelib",
            "tkinter",
            "turtledemo",
            "ensurepip",
            "lib2to3",
            "pydoc_data",
            "distutils",
            "unittest",
            "site-packages",
            "dist-packages",
            "config-3.11-x86_64-linux-gnu",
        ],
    );
    py.dir("app").data(
        "app/main.py",
        "import os, sys, json\nprint(json.dumps({'ok': True, 'cwd': os.getcwd()}))\n",
        0o644,
    );
    let mut node = base(&[], &["/usr/bin/node"]);
    for l in host_libs("/usr/bin/node") {
        node.add(&l);
    }
    node.dir("app")
        .data(
            "app/main.js",
            "const u = require('./util');\nconsole.log(u.greeting);\n",
            0o644,
        )
        .data("app/util.js", "exports.greeting = 'hi';\n", 0o644)
        .data("app/package.json", "{\"name\": \"app\"}\n", 0o644);
    let env = ["PATH=/usr/local/bin:/usr/bin:/bin"];
    vec![
        Scenario {
            name: "bash script execs ls",
            tree: shell,
            config: config(&["/app/run.sh"], &[], &env, "/"),
        },
        Scenario {
            name: "perl via env shebang",
            tree: perl,
            config: config(&["/app/hello.pl"], &[], &env, "/"),
        },
        Scenario {
            name: "python3 script (json)",
            tree: py,
            config: config(&[], &["python3", "/app/main.py"], &env, "/"),
        },
        Scenario {
            name: "node script (require)",
            tree: node,
            config: config(&["node"], &["/app/main.js"], &env, "/"),
        },
    ]
}

/// The libraries `ldd` lists for a host binary (a host tool, independent of the analyzer).
fn host_libs(bin: &str) -> Vec<String> {
    let o = Command::new("ldd").arg(bin).output();
    let text = o
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split("=> ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter(|p| p.starts_with('/'))
        .map(str::to_string)
        .collect()
}

/// Absolute path of a tool (the startup runs with the image's environment, not ours).
fn tool_path(t: &str) -> String {
    Command::new("sh")
        .args(["-c", &format!("command -v {t}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| t.to_string())
}

fn usable() -> bool {
    let root =
        Command::new("id").arg("-u").output().ok().map(|o| o.stdout) == Some(b"0\n".to_vec());
    let tools = ["strace", "chroot"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let host = [
        "/bin/bash",
        "/bin/ls",
        "/usr/bin/perl",
        "/usr/bin/python3.11",
        "/etc/ld.so.cache",
    ]
    .iter()
    .all(|p| std::path::Path::new(p).exists());
    if !(root && tools && host) {
        eprintln!(
            "skipping: needs root, strace, chroot and this machine's bash/ls/perl/python3.11"
        );
    }
    root && tools && host
}

/// Files the kernel reads for an exec without an `open` the trace shows: the shebang
/// interpreter and the ELF interpreter (from `readelf`, not from the analyzer's code).
fn kernel_reads(root: &std::path::Path, exe: &str, out: &mut Vec<String>, depth: usize) {
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
        // readelf cannot follow absolute links inside the rootfs: give it the real file.
        let real = match std::fs::canonicalize(&host) {
            Ok(p) => p,
            Err(_) => host.clone(),
        };
        let o = Command::new("readelf").arg("-lW").arg(&real).output();
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

/// Paths opened or executed successfully after the chroot, from `strace -f` output, and
/// the subset that was executed.
fn traced_paths(trace: &str) -> (Vec<String>, Vec<String>) {
    let mut chrooted = false;
    let mut pending: HashMap<String, (String, bool)> = HashMap::new();
    let mut out = Vec::new();
    let mut execs = Vec::new();
    let first_quoted = |s: &str| -> Option<String> {
        let a = s.find('"')?;
        let b = s[a + 1..].find('"')?;
        Some(s[a + 1..a + 1 + b].to_string())
    };
    for line in trace.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        let rest = rest.trim_start();
        if rest.starts_with("chroot(") && rest.trim_end().ends_with("= 0") {
            chrooted = true;
            continue;
        }
        if !chrooted {
            continue;
        }
        let data_call = ["execve(", "open(", "openat(", "openat2("]
            .iter()
            .any(|c| rest.starts_with(c));
        if data_call {
            let Some(p) = first_quoted(rest) else {
                continue;
            };
            if rest.ends_with("<unfinished ...>") {
                pending.insert(pid.to_string(), (p, rest.starts_with("execve(")));
            } else if !rest.contains("= -1") {
                if rest.starts_with("execve(") {
                    execs.push(p.clone());
                }
                out.push(p);
            }
        } else if rest.starts_with("<... ")
            && rest.contains("resumed>")
            && let Some((p, exec)) = pending.remove(pid)
            && !rest.contains("= -1")
        {
            if exec {
                execs.push(p.clone());
            }
            out.push(p);
        }
    }
    (out, execs)
}

#[derive(Default)]
struct Row {
    name: String,
    truth_files: usize,
    predicted_files: usize,
    hit_files: usize,
    truth_bytes: u64,
    predicted_bytes: u64,
    hit_bytes: u64,
    analysis_ms: f64,
    missed: Vec<String>,
    extra: Vec<String>,
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

async fn run(s: Scenario) -> Row {
    let img = TestImage::new(vec![s.tree.layer()], 4 << 20);
    let t0 = Instant::now();
    let a = img.analyze(&s.config).await;
    let analysis_ms = t0.elapsed().as_secs_f64() * 1000.0;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    s.tree.materialize(&root);
    let trace_file = dir.path().join("trace");
    let argv = s.config.argv();
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=execve,open,openat,openat2,chroot",
            "-o",
        ])
        .arg(&trace_file)
        .arg(tool_path("chroot"))
        .arg(&root)
        .args(&argv)
        .env_clear()
        .envs(s.config.env.iter().filter_map(|kv| kv.split_once('=')))
        .output()
        .expect("running strace");
    assert!(
        out.status.success(),
        "{}: the real startup failed: {}{}",
        s.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = std::fs::read_to_string(&trace_file).unwrap();
    // Canonical regular files of the image that the startup read.
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let (mut seen, execs) = traced_paths(&trace);
    for e in &execs {
        kernel_reads(&root, e, &mut seen, 0);
    }
    for p in seen {
        if let Ok(r) = resolve(&img.view, "/", &p, true)
            && let Some((_, e)) = r.found
            && e.kind == EntryKind::File
        {
            truth.insert(r.path.clone(), e.size);
        }
    }
    let predicted: BTreeMap<String, u64> =
        a.files.iter().map(|f| (f.path.clone(), f.size)).collect();
    let hit: BTreeSet<&String> = truth
        .keys()
        .filter(|k| predicted.contains_key(*k))
        .collect();
    Row {
        name: s.name.to_string(),
        truth_files: truth.len(),
        predicted_files: predicted.len(),
        hit_files: hit.len(),
        truth_bytes: truth.values().sum(),
        predicted_bytes: predicted.values().sum(),
        hit_bytes: hit.iter().map(|k| truth[*k]).sum(),
        analysis_ms,
        missed: truth
            .keys()
            .filter(|k| !predicted.contains_key(*k))
            .cloned()
            .collect(),
        extra: predicted
            .iter()
            .filter(|(k, _)| !truth.contains_key(*k))
            .map(|(k, v)| format!("{k} ({v} bytes)"))
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_prediction_against_real_startups() {
    if !usable() {
        return;
    }
    let mut rows = Vec::new();
    for s in scenarios() {
        rows.push(run(s).await);
    }
    report(&rows);
}

/// The JVM (java -version on Debian's OpenJDK 17: libjvm, CDS archive, lib/modules, jvm.cfg,
/// security and conf files via /etc/java-17-openjdk links).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jvm_prediction_against_a_real_startup() {
    let home = "/usr/lib/jvm/java-17-openjdk-amd64";
    if !usable() || !std::path::Path::new(&format!("{home}/bin/java")).exists() {
        eprintln!("skipping: no OpenJDK 17 at {home}");
        return;
    }
    let mut t = base(&[], &[]);
    for l in host_libs(&format!("{home}/bin/java"))
        .into_iter()
        .chain(host_libs(&format!("{home}/lib/server/libjvm.so")))
    {
        t.add(&l);
    }
    t.add_tree(home, &["jmods", "include", "man", "legal", "docs"]);
    t.add_tree("/etc/java-17-openjdk", &[]);
    t.add("/etc/ssl/certs/java/cacerts");
    let cfg = config(
        &[&format!("{home}/bin/java")],
        &["-version"],
        // A bare chroot has no /proc, so the loader cannot expand $ORIGIN (java's RUNPATH
        // to libjli): name the directory explicitly (the analyzer honors it too).
        &[
            "PATH=/usr/bin:/bin",
            "LD_LIBRARY_PATH=/usr/lib/jvm/java-17-openjdk-amd64/lib",
        ],
        "/",
    );
    let row = run(Scenario {
        name: "java -version (JDK 17)",
        tree: t,
        config: cfg,
    })
    .await;
    report(&[row]);
}

fn report(rows: &[Row]) {
    println!(
        "\n{:<26} {:>6} {:>6} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8} {:>9}",
        "image",
        "truth",
        "pred",
        "f-recall",
        "f-prec",
        "truth-B",
        "pred-B",
        "b-recall",
        "b-prec",
        "analysis"
    );
    for r in rows {
        println!(
            "{:<26} {:>6} {:>6} {:>7.1}% {:>7.1}% {:>10} {:>10} {:>7.1}% {:>7.1}% {:>7.1}ms",
            r.name,
            r.truth_files,
            r.predicted_files,
            r.file_recall() * 100.0,
            r.file_precision() * 100.0,
            r.truth_bytes,
            r.predicted_bytes,
            r.byte_recall() * 100.0,
            r.byte_precision() * 100.0,
            r.analysis_ms
        );
        for m in &r.missed {
            println!("    missed: {m}");
        }
        for m in &r.extra {
            println!("    not read: {m}");
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
