//! The analyzer on images made of this machine's real binaries and libraries: a bash
//! entrypoint script exec'ing a perl script through `/usr/bin/env`, with Debian's merged
//! /usr links and ld.so.conf includes; then the plan built from the analysis.

mod startup_common;

use startup_common::{HostTree, TestImage, config, host_real, paths};
use talaria_artifact::startup::{FileClass, PlanOptions, build_plan, path_patterns};
use talaria_testenv::images::LayerBuilder;

const HOST_FILES: &[&str] = &[
    "/bin/bash",
    "/usr/bin/env",
    "/usr/bin/perl",
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libtinfo.so.6",
    "/lib/x86_64-linux-gnu/libm.so.6",
    "/lib/x86_64-linux-gnu/libcrypt.so.1",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d/libc.conf",
    "/etc/ld.so.conf.d/x86_64-linux-gnu.conf",
];

fn host_available() -> bool {
    let ok = HOST_FILES.iter().all(|p| std::path::Path::new(p).exists());
    if !ok {
        eprintln!("skipping: this machine lacks some of {HOST_FILES:?}");
    }
    ok
}

fn image() -> TestImage {
    let mut t = HostTree::default();
    for f in HOST_FILES {
        t.add(f);
    }
    let app = LayerBuilder::new()
        .dir("app", 0o755)
        .file(
            "app/run.sh",
            "#!/bin/bash\nset -e\nexport GREETING=hi\ncd /app\nexec ./hello.pl \"$@\"\n",
            0o755,
        )
        .file(
            "app/hello.pl",
            "#!/usr/bin/env perl\nprint \"hello\\n\";\n",
            0o755,
        );
    TestImage::new(vec![t.layer(), app], 64 * 1024)
}

#[tokio::test]
async fn bash_script_execs_perl_through_env() {
    if !host_available() {
        return;
    }
    let img = image();
    let cfg = config(&["/app/run.sh"], &["--verbose"], &[], "/");
    let t0 = std::time::Instant::now();
    let a = img.analyze(&cfg).await;
    eprintln!(
        "analysis: {} files, {} links, {} bytes read, {:?}",
        a.files.len(),
        a.links.len(),
        a.bytes_read,
        t0.elapsed()
    );
    let got = paths(&a);
    for want in [
        "/app/run.sh".to_string(),
        host_real("/bin/bash"),
        host_real("/lib64/ld-linux-x86-64.so.2"),
        host_real("/lib/x86_64-linux-gnu/libtinfo.so.6"),
        host_real("/lib/x86_64-linux-gnu/libc.so.6"),
        "/app/hello.pl".to_string(),
        host_real("/usr/bin/env"),
        host_real("/usr/bin/perl"),
        host_real("/lib/x86_64-linux-gnu/libm.so.6"),
        host_real("/lib/x86_64-linux-gnu/libcrypt.so.1"),
    ] {
        assert!(got.contains(&want.as_str()), "{want} missing from {got:#?}");
    }
    // The symlinks on the way are recorded.
    assert!(a.links.contains(&"/bin".to_string()), "{:?}", a.links);
    assert!(
        a.links
            .iter()
            .any(|l| l == "/lib64/ld-linux-x86-64.so.2" || l == "/lib64")
    );
    // Access order: the exec chain first, then libraries.
    let classes: Vec<FileClass> = a.files.iter().map(|f| f.class).collect();
    assert!(classes.windows(2).all(|w| w[0] <= w[1]), "{classes:?}");
    let pos = |p: &str| got.iter().position(|g| *g == p).unwrap();
    assert!(pos("/app/run.sh") < pos(&host_real("/usr/bin/perl")));
    assert!(pos(&host_real("/usr/bin/perl")) < pos(&host_real("/lib/x86_64-linux-gnu/libc.so.6")));
    // Every file says why it is there.
    let perl = a.file(&host_real("/usr/bin/perl")).unwrap();
    assert!(
        perl.reasons.iter().any(|r| r.contains("env")),
        "{:?}",
        perl.reasons
    );
    let libc = a
        .file(&host_real("/lib/x86_64-linux-gnu/libc.so.6"))
        .unwrap();
    assert_eq!(libc.class, FileClass::Library);
    assert!(
        libc.reasons
            .iter()
            .any(|r| r.contains("DT_NEEDED libc.so.6"))
    );
    // Nothing went unexplained on a well-formed image.
    assert!(a.notes.is_empty(), "{:#?}", a.notes);
    // The analyzer reads headers, not whole binaries.
    let total: u64 = a.files.iter().map(|f| f.size).sum();
    assert!(a.bytes_read * 4 < total, "read {} of {total}", a.bytes_read);
}

#[tokio::test]
async fn plan_maps_files_to_spans_within_budget() {
    if !host_available() {
        return;
    }
    let img = image();
    let cfg = config(&["/bin/bash", "-c", "exec /app/hello.pl"], &[], &[], "/");
    let a = img.analyze(&cfg).await;
    let layers = img.layer_refs();
    let opts = |budget| PlanOptions {
        profile: "startup-local-v1".into(),
        version: 1,
        budget,
    };
    let plan = build_plan(&a, &layers, &opts(u64::MAX));
    assert_eq!(plan.profile, "startup-local-v1");
    assert!(!plan.entries.is_empty());
    // Every file with bytes is planned, in the analysis order, with valid spans covering it.
    let with_bytes: Vec<&str> = a
        .files
        .iter()
        .filter(|f| f.size > 0)
        .map(|f| f.path.as_str())
        .collect();
    let planned: Vec<&str> = plan.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(planned, with_bytes);
    for (e, f) in plan
        .entries
        .iter()
        .zip(a.files.iter().filter(|f| f.size > 0))
    {
        let ix = layers[e.layer as usize].unwrap();
        assert_eq!(e.layer as usize, f.layer);
        let first = ix.span_for(f.data_offset) as u32;
        let last = ix.span_for(f.data_offset + f.size - 1) as u32;
        assert_eq!(e.spans, (first..=last).collect::<Vec<_>>(), "{}", e.path);
        assert_eq!(e.priority, f.class as u32);
        // Whole files: the planned bytes are the file's; every entry says why, briefly.
        assert_eq!(e.bytes, f.size, "{}", e.path);
        assert!(
            !e.reason.is_empty() && e.reason.len() <= 64,
            "{}: {:?}",
            e.path,
            e.reason
        );
    }
    let reason = |p: &str| {
        plan.entries
            .iter()
            .find(|e| e.path == p)
            .map(|e| e.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(reason(&host_real("/bin/bash")), "entrypoint");
    assert_eq!(reason(&host_real("/lib64/ld-linux-x86-64.so.2")), "interp");
    assert_eq!(
        reason(&host_real("/lib/x86_64-linux-gnu/libtinfo.so.6")),
        "needed by bash"
    );
    // Plans written before `bytes` and `reason` existed still parse; the new fields
    // round-trip.
    let old: talaria_artifact::startup::plan::StartupPlan = serde_json::from_str(
        r#"{"version":1,"profile":"startup-local-v1","prefetch_budget":1,"paths":[],
            "entries":[{"layer":0,"path":"/bin/sh","spans":[0],"priority":0}]}"#,
    )
    .expect("an old plan parses");
    assert_eq!(old.entries[0].bytes, 0);
    assert_eq!(old.entries[0].reason, "");
    let again: talaria_artifact::startup::plan::StartupPlan =
        serde_json::from_slice(&serde_json::to_vec(&plan).unwrap()).unwrap();
    assert_eq!(again, plan);
    assert!(
        plan.entries
            .windows(2)
            .all(|w| w[0].priority <= w[1].priority)
    );
    // A budget too small for libc leaves it out but keeps smaller files.
    let libc = host_real("/lib/x86_64-linux-gnu/libc.so.6");
    let small = build_plan(&a, &layers, &opts(512 * 1024));
    assert!(small.entries.len() < plan.entries.len());
    assert!(!small.entries.iter().any(|e| e.path == libc));
    let span_bytes: u64 = {
        let mut seen = std::collections::HashSet::new();
        small
            .entries
            .iter()
            .flat_map(|e| e.spans.iter().map(move |s| (e.layer, *s)))
            .filter(|k| seen.insert(*k))
            .map(|(l, s)| layers[l as usize].unwrap().spans[s as usize].uncompressed_size)
            .sum()
    };
    assert!(span_bytes <= 512 * 1024, "{span_bytes}");
    // Patterns: absolute, sorted, the links included.
    let pats = path_patterns(&a);
    assert_eq!(plan.paths, pats);
    assert!(pats.iter().all(|p| p.starts_with('/')));
    assert!(pats.windows(2).all(|w| w[0] <= w[1]));
    assert!(pats.contains(&"/app/hello.pl".to_string()));
}
