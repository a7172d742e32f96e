//! The `talaria` command end to end: a real OCI layout made by hack/demo-image.sh and a real
//! registry process (talaria-testenv), checked against the files the image was made from.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use talaria_testenv::registry::Registry;

fn talaria(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(args)
        .output()
        .expect("run talaria");
    eprintln!(
        "$ talaria {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(2000)
            .collect::<String>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> Vec<u8> {
    let out = talaria(args);
    assert!(out.status.success(), "talaria {args:?} failed: {out:?}");
    out.stdout
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_slice(&ok(&a)).expect("JSON output")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Makes the demo image (3 layers: busybox, Perl's library, overwrites + whiteouts).
fn demo_layout(dir: &Path) {
    let st = Command::new("bash")
        .arg(repo_root().join("hack/demo-image.sh"))
        .arg(dir)
        .status()
        .expect("run hack/demo-image.sh");
    assert!(st.success(), "hack/demo-image.sh failed");
}

fn perl_lib() -> PathBuf {
    let p = PathBuf::from("/usr/share/perl/5.36");
    if p.is_dir() {
        p
    } else {
        PathBuf::from("/usr/share/perl5")
    }
}

/// Regular files of the host directory that layer 2 copied to /app/lib (every `step`-th).
fn sample_files(step: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![perl_lib()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    out.into_iter().step_by(step).collect()
}

/// Checks the merged view through `cat`: overwritten, deleted, opaque, hard-linked and
/// copied files, plus symlinks resolved inside the image.
fn check_files(image: &str) {
    assert_eq!(
        ok(&["cat", image, "/app/hello.txt"]),
        b"hello from layer 3 (overwrites layer 1)\n"
    );
    assert_eq!(
        ok(&["cat", image, "/app/data/new-hardlink.txt"]),
        b"new data\n"
    );
    for gone in ["/etc/motd", "/app/data/old.txt", "/no/such/file"] {
        assert_eq!(
            talaria(&["cat", image, gone]).status.code(),
            Some(3),
            "{gone} must be absent"
        );
    }
    let busybox = std::fs::read(which("busybox")).unwrap();
    assert_eq!(
        ok(&["cat", image, "/bin/sh"]),
        busybox,
        "/bin/sh -> busybox"
    );
    let files = sample_files(25);
    assert!(files.len() > 20, "too few sample files: {}", files.len());
    for f in files {
        let rel = f.strip_prefix(perl_lib()).unwrap();
        let inside = format!("/app/lib/{}", rel.display());
        assert_eq!(
            ok(&["cat", image, &inside]),
            std::fs::read(&f).unwrap(),
            "{inside}"
        );
    }
}

fn which(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not on PATH: run hack/setup.sh"))
}

#[test]
fn build_inspect_cat_on_an_oci_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    demo_layout(&dir);
    let image = format!("oci:{}", dir.display());

    // No artifact yet: inspect says so, cat exits 4.
    let before = json(&["inspect", &image]);
    assert_eq!(before["artifacts"].as_array().unwrap().len(), 0);
    assert!(before["nodeWouldUse"].is_null());
    assert_eq!(
        talaria(&["cat", &image, "/etc/passwd"]).status.code(),
        Some(4)
    );

    let built = json(&["build", &image]);
    assert_eq!(built["adopted"], false);
    assert_eq!(built["layers"].as_array().unwrap().len(), 3);
    let art = built["artifact"]["digest"].as_str().unwrap().to_string();

    let after = json(&["inspect", &image]);
    assert_eq!(after["nodeWouldUse"], art.as_str());
    assert_eq!(after["artifacts"][0]["accelerated"], true);
    assert_eq!(
        after["artifacts"][0]["indexes"].as_array().unwrap().len(),
        3
    );

    // Building again adopts the artifact instead of building a second one.
    let again = json(&["build", &image]);
    assert_eq!(again["adopted"], true);
    assert_eq!(again["artifact"]["digest"], art.as_str());
    assert_eq!(
        json(&["inspect", &image])["artifacts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    check_files(&image);
}

#[test]
fn build_inspect_cat_on_a_registry() {
    let registry = Registry::start().expect("start the registry");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    demo_layout(&dir);
    let image = format!("{}/demo/app:v1", registry.host());
    // Pushed by crane, not by our code, so reading it back tests our client independently.
    let crane = talaria_testenv::tool("crane").expect("crane: run hack/setup.sh");
    let st = Command::new(crane)
        .args(["push", "--insecure"])
        .arg(&dir)
        .arg(&image)
        .status()
        .expect("run crane");
    assert!(st.success(), "crane push failed");

    let default = json(&["build", &image, "--profile", "default"]);
    let accel = json(&["build", &image]);
    assert_ne!(default["artifact"]["digest"], accel["artifact"]["digest"]);
    assert_ne!(default["key"], accel["key"]);

    let info = json(&["inspect", &image]);
    assert_eq!(info["artifacts"].as_array().unwrap().len(), 2);
    assert_eq!(
        info["nodeWouldUse"], accel["artifact"]["digest"],
        "accelerated is preferred"
    );

    check_files(&image);

    // Errors a script can tell apart.
    let missing = format!("{}/demo/none:v1", registry.host());
    assert_eq!(talaria(&["inspect", &missing]).status.code(), Some(3));
    assert_eq!(
        talaria(&["build", "not a reference"]).status.code(),
        Some(1)
    );
    assert_eq!(talaria(&["bogus"]).status.code(), Some(2));
}

/// `build --startup-trace`: the plan holds the recorded files in read order (only the span
/// of the part read of a big file), and the new artifact replaces the predicted one.
#[test]
fn build_with_a_startup_trace_plans_what_was_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    demo_layout(&dir);
    let image = format!("oci:{}", dir.display());
    ok(&["build", "--profile", "default", &image]);
    let predicted = json(&["build", &image]);
    let layers: Vec<String> = predicted["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    // busybox (≥ 1 MB) read in one page at 512 KiB, then /etc/passwd: as a node records them.
    let trace = serde_json::json!({
        "version": 1,
        "layers": [{
            "digest": layers[0],
            "files": [
                {"path": "etc/passwd", "first_ms": 20, "ranges": [{"offset": 0, "len": 4096}]},
                {"path": "bin/busybox", "first_ms": 10, "ranges": [{"offset": 524288, "len": 4096}]},
                {"path": "etc/not-there", "first_ms": 30, "ranges": [{"offset": 0, "len": 1}]}
            ]
        }]
    });
    let trace_file = tmp.path().join("trace.json");
    std::fs::write(&trace_file, serde_json::to_vec(&trace).unwrap()).unwrap();
    let trace_arg = trace_file.to_str().unwrap();
    // No wait: the recorded build usually lands in the same second as the predicted one
    // (`created` has whole seconds), and the recorded plan must still win.
    // Fine spans (64 KiB) where the start read, the knob's 4 MiB elsewhere.
    let built = json(&[
        "build",
        "--startup-trace",
        trace_arg,
        "--hot-span-size",
        "65536",
        &image,
    ]);
    assert_eq!(built["adopted"], false, "a trace builds, never adopts");
    let spans = |b: &serde_json::Value, i: usize| b["layers"][i]["spans"].as_u64().unwrap();
    assert!(
        spans(&built, 0) > spans(&predicted, 0),
        "layer 0 got finer spans where busybox was read ({} vs {})",
        spans(&built, 0),
        spans(&predicted, 0)
    );
    assert_eq!(
        spans(&built, 1),
        spans(&predicted, 1),
        "layer 1 was not read: same spans"
    );

    let after = json(&["inspect", &image]);
    assert_eq!(
        after["nodeWouldUse"], built["artifact"]["digest"],
        "the recorded artifact is the one a node uses"
    );
    let recorded = after["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["digest"] == built["artifact"]["digest"])
        .expect("the recorded artifact is listed");
    assert_eq!(recorded["planRecorded"], true);
    // The pack holds what was read: busybox's page (in a file over 64 KiB: the page only)
    // and /etc/passwd whole; the file the image does not have is not in it.
    let pack = &after["plan"]["pack"];
    assert_eq!(pack["files"], 2, "{pack}");
    assert!(pack["bytes"].as_u64().unwrap() > 4096, "{pack}");
    assert_eq!(
        recorded["pack"], pack["digest"],
        "the manifest lists the pack blob"
    );
    let entries = after["plan"]["entries"].as_array().unwrap();
    let paths: Vec<&str> = entries
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/bin/busybox", "/etc/passwd"],
        "read order, known files"
    );
    assert!(entries.iter().all(|e| e["reason"] == "recorded"));
    let spans = entries[0]["spans"].as_array().unwrap();
    assert!(
        spans.len() == 1 || spans.len() == 2,
        "the page read of busybox is one fine span (two at a boundary): {spans:?}"
    );

    // A trace that is not one is refused, with the file named.
    std::fs::write(&trace_file, b"{\"version\": 7, \"layers\": []}").unwrap();
    let out = talaria(&["build", "--startup-trace", trace_arg, &image]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trace.json") && err.contains("version 7"),
        "{err}"
    );
    check_files(&image);
}

/// With `--key`, `cat` and `inspect` read only through an artifact signed by that key (the
/// node's rule for referrers): unsigned or signed by another key, there is none to use.
#[test]
fn key_reads_only_through_artifacts_signed_by_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    demo_layout(&dir);
    let image = format!("oci:{}", dir.display());
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    ok(&["keygen", ours.to_str().unwrap()]);
    ok(&["keygen", theirs.to_str().unwrap()]);
    let key = |p: &Path, ext: &str| format!("{}.{ext}", p.display());
    // Never over an existing key.
    assert!(
        !talaria(&["keygen", ours.to_str().unwrap()])
            .status
            .success()
    );

    let built = json(&["build", &image]);
    let art = built["artifact"]["digest"].as_str().unwrap().to_string();
    let plain = ok(&["cat", &image, "/etc/passwd"]);
    let ours_pub = key(&ours, "pub");
    assert_eq!(
        talaria(&["cat", &image, "/etc/passwd", "--key", &ours_pub])
            .status
            .code(),
        Some(4),
        "an unsigned artifact was read through"
    );
    assert!(json(&["inspect", &image, "--key", &ours_pub])["nodeWouldUse"].is_null());

    // Signed as it is built (here: adopted, then signed).
    ok(&["build", &image, "--sign-key", &key(&ours, "key")]);
    assert_eq!(
        ok(&["cat", &image, "/etc/passwd", "--key", &ours_pub]),
        plain
    );
    assert_eq!(
        json(&["inspect", &image, "--key", &ours_pub])["nodeWouldUse"],
        art.as_str()
    );
    assert_eq!(
        talaria(&["cat", &image, "/etc/passwd", "--key", &key(&theirs, "pub")])
            .status
            .code(),
        Some(4),
        "read through an artifact another key signed"
    );
}
