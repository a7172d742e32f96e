//! Path resolution inside the root, and hostile images: the analyzer returns what it can,
//! says why, and never panics or loops.

mod startup_common;

use startup_common::{TestImage, config, paths};
use talaria_artifact::index::EntryKind;
use talaria_artifact::view::resolve::{MAX_SYMLINKS, ResolveError, resolve};
use talaria_testenv::images::LayerBuilder;

fn tree() -> TestImage {
    let l = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .file("bin/tool", "#!/bin/tool\n", 0o755)
        .file("etc/passwd", "root", 0o644)
        .file("usr/lib/real.so", "lib", 0o644)
        .symlink("usr/lib/rel.so", "real.so")
        .symlink("usr/lib/abs.so", "/usr/lib/real.so")
        .symlink("lib", "usr/lib")
        .symlink("etc/escape", "../../../../../../etc/passwd")
        .symlink("etc/escape-abs", "/../../etc/passwd")
        .symlink("etc/dotdot", "../usr/lib/../lib/rel.so")
        .symlink("loop-a", "loop-b")
        .symlink("loop-b", "loop-a")
        .symlink("self", "self")
        .symlink("dangling", "/nowhere");
    TestImage::new(vec![l], 64 * 1024)
}

#[test]
fn resolution_follows_links_within_the_root() {
    let img = tree();
    let v = &img.view;
    let r = resolve(v, "/", "/lib/rel.so", true).unwrap();
    assert_eq!(r.path, "/usr/lib/real.so");
    assert_eq!(r.links, ["/lib", "/usr/lib/rel.so"]);
    assert_eq!(
        resolve(v, "/", "lib/abs.so", true).unwrap().path,
        "/usr/lib/real.so"
    );
    // Relative to a working directory; `..` clamps at the root.
    assert_eq!(
        resolve(v, "/usr", "../../../bin/tool", true).unwrap().path,
        "/bin/tool"
    );
    assert_eq!(
        resolve(v, "/", "/etc/escape", true).unwrap().path,
        "/etc/passwd"
    );
    assert_eq!(
        resolve(v, "/", "/etc/escape-abs", true).unwrap().path,
        "/etc/passwd"
    );
    assert_eq!(
        resolve(v, "/", "/etc/dotdot", true).unwrap().path,
        "/usr/lib/real.so"
    );
    // Without following the last component, the link itself.
    let r = resolve(v, "/", "/lib/rel.so", false).unwrap();
    assert_eq!(r.path, "/usr/lib/rel.so");
    assert_eq!(r.kind(), EntryKind::Symlink);
    // `..` after a followed link goes up from the target, as the kernel does.
    assert_eq!(
        resolve(v, "/", "/lib/../bin/tool", true).unwrap_err(),
        ResolveError::NotFound {
            path: "/lib/../bin/tool".into(),
            at: "/usr/bin/tool".into()
        }
    );
    assert!(matches!(
        resolve(v, "/", "/loop-a", true),
        Err(ResolveError::Loop { .. })
    ));
    assert!(matches!(
        resolve(v, "/", "/self/x", true),
        Err(ResolveError::Loop { .. })
    ));
    assert!(matches!(
        resolve(v, "/", "/dangling", true),
        Err(ResolveError::NotFound { .. })
    ));
    assert!(matches!(
        resolve(v, "/", "/bin/tool/x", true),
        Err(ResolveError::NotADirectory { .. })
    ));
    assert_eq!(resolve(v, "/", "/..", true).unwrap().path, "/");
}

#[test]
fn symlink_chains_are_bounded() {
    // A chain of exactly MAX_SYMLINKS links resolves; one more is a loop.
    let mut l = LayerBuilder::new().file("end", "x", 0o644);
    for i in 0..=MAX_SYMLINKS {
        let target = if i == 0 {
            "end".to_string()
        } else {
            format!("l{}", i - 1)
        };
        l = l.symlink(&format!("l{i}"), &target);
    }
    let img = TestImage::new(vec![l], 64 * 1024);
    let ok = resolve(&img.view, "/", &format!("/l{}", MAX_SYMLINKS - 1), true).unwrap();
    assert_eq!(ok.path, "/end");
    assert_eq!(ok.links.len(), MAX_SYMLINKS);
    assert!(matches!(
        resolve(&img.view, "/", &format!("/l{MAX_SYMLINKS}"), true),
        Err(ResolveError::Loop { .. })
    ));
}

fn elf_with(phnum: u16, phoff: u64) -> Vec<u8> {
    let mut b = vec![0u8; 128];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[32..40].copy_from_slice(&phoff.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&phnum.to_le_bytes());
    b
}

#[tokio::test]
async fn hostile_images_are_reported_not_fatal() {
    let mut dynamic_bomb = elf_with(2, 64);
    // PT_INTERP with an absurd length, PT_DYNAMIC far past the end of the file.
    let mut ph = vec![0u8; 112];
    ph[..4].copy_from_slice(&3u32.to_le_bytes());
    ph[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    dynamic_bomb.truncate(64);
    dynamic_bomb.extend_from_slice(&ph);
    let l = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/huge-phnum", elf_with(65535, 64), 0o755)
        .file("bin/phoff-past-end", elf_with(4, u64::MAX - 8), 0o755)
        .file("bin/bad-interp", dynamic_bomb, 0o755)
        .file("bin/truncated", b"\x7fELF\x02\x01".to_vec(), 0o755)
        .file("bin/a", "#!/bin/b\n", 0o755)
        .file("bin/b", "#!/bin/a\n", 0o755)
        .file("bin/sh", elf_with(0, 64), 0o755)
        .symlink("bin/loop", "loop")
        .symlink("bin/out", "../../../../../../../bin/a")
        .file("bin/noexec", "x", 0o644);
    let img = TestImage::new(vec![l], 64 * 1024);
    let run = |ep: &[&str]| {
        let cfg = config(ep, &[], &["PATH=/bin"], "/");
        let img = &img;
        async move { img.analyze(&cfg).await }
    };
    for bin in [
        "/bin/huge-phnum",
        "/bin/phoff-past-end",
        "/bin/bad-interp",
        "/bin/truncated",
    ] {
        let a = run(&[bin]).await;
        assert_eq!(paths(&a), [bin], "the file itself is still planned");
        assert!(
            a.notes
                .iter()
                .any(|n| n.subject == bin && n.message.contains("ELF")),
            "{bin}: {:?}",
            a.notes
        );
    }
    // Interpreter loops end at the nesting bound.
    let a = run(&["/bin/a"]).await;
    assert!(paths(&a).contains(&"/bin/b"));
    assert!(
        a.notes.iter().any(|n| n.message.contains("nested")),
        "{:?}",
        a.notes
    );
    // A link loop as the entrypoint; a link escaping the root stays inside.
    let a = run(&["/bin/loop"]).await;
    assert!(a.files.is_empty());
    assert!(
        a.notes.iter().any(|n| n.message.contains("symbolic links")),
        "{:?}",
        a.notes
    );
    let a = run(&["out"]).await;
    assert!(paths(&a).contains(&"/bin/a"));
    // Missing and non-executable programs; no command at all.
    let a = run(&["nope", "arg"]).await;
    assert!(a.files.is_empty());
    assert!(
        a.notes
            .iter()
            .any(|n| n.subject == "nope" && n.message.contains("PATH"))
    );
    let a = run(&["noexec"]).await;
    assert!(a.files.is_empty() && !a.notes.is_empty());
    let a = run(&[]).await;
    assert!(
        a.notes
            .iter()
            .any(|n| n.message.contains("neither Entrypoint nor Cmd"))
    );
    // A huge `sh -c` script: bounded work, the first commands still found.
    let script = (0..10_000)
        .map(|i| format!("/bin/a{i}"))
        .collect::<Vec<_>>()
        .join(" && ");
    let a = run(&["/bin/sh", "-c", &script]).await;
    assert!(a.notes.len() <= 257, "{}", a.notes.len());
    assert!(a.notes.iter().any(|n| n.subject == "/bin/a0"));
}

#[tokio::test]
async fn deep_trees_and_long_paths_are_bounded() {
    // 3,000 nested directories with a program at the bottom (a 10,000-level tar would
    // hold 100 MB of path names: the bound that matters, the path length, is hit here).
    let depth = 3_000;
    let mut l = LayerBuilder::new();
    let mut p = String::new();
    for _ in 0..depth {
        if !p.is_empty() {
            p.push('/');
        }
        p.push('d');
        l = l.dir(&p, 0o755);
    }
    let deep_file = format!("{p}/prog");
    l = l
        .file(&deep_file, "#!/bin/none\n", 0o755)
        .symlink("deep", &p);
    let img = TestImage::new(vec![l], 1024 * 1024);
    // Deeper than PATH_MAX: a clear error, not a walk.
    let cfg = config(&[&format!("/{deep_file}")], &[], &[], "/");
    let a = img.analyze(&cfg).await;
    assert!(a.files.is_empty());
    assert!(
        a.notes.iter().any(|n| n.message.contains("too long")),
        "{:?}",
        a.notes
    );
    // A 10,000-component path, and a 10,000-level WorkingDir.
    let long = "/d".repeat(10_000);
    let cfg = config(&[&format!("{long}/prog")], &[], &[], &long);
    let a = img.analyze(&cfg).await;
    assert!(a.files.is_empty() && !a.notes.is_empty());
    // `..` storms stay at the root; a path longer than PATH_MAX is refused up front.
    let up = "../".repeat(300);
    let r = resolve(&img.view, "/", &format!("{up}d/d/../{up}"), true).unwrap();
    assert_eq!(r.path, "/");
    let up = "../".repeat(10_000);
    assert!(matches!(
        resolve(&img.view, "/", &up, true),
        Err(ResolveError::TooLong { .. })
    ));
}

#[tokio::test]
async fn module_graphs_are_bounded() {
    // 400 Node modules in a chain, each also requiring 50 packages that do not exist, and
    // a Python script importing 2,000 modules: the rules stop at their bounds and say so.
    let mut l = LayerBuilder::new()
        .dir("usr/bin", 0o755)
        .file("usr/bin/node", elf_with(0, 64), 0o755)
        .file("usr/bin/python3.11", elf_with(0, 64), 0o755)
        .dir("usr/lib/python3.11", 0o755)
        .dir("app", 0o755);
    for i in 0..400 {
        let mut src = format!("require('./m{}');\n", i + 1);
        for j in 0..50 {
            src.push_str(&format!("require('missing-{j}');\n"));
        }
        l = l.file(&format!("app/m{i}.js"), src, 0o644);
    }
    let imports: String = (0..2000).map(|i| format!("import mod{i}\n")).collect();
    l = l.file("app/main.py", imports, 0o644);
    for i in 0..2000 {
        l = l.file(&format!("app/mod{i}.py"), "import os\n", 0o644);
    }
    let img = TestImage::new(vec![l], 1024 * 1024);
    let a = img
        .analyze(&config(
            &["node", "/app/m0.js"],
            &[],
            &["PATH=/usr/bin"],
            "/",
        ))
        .await;
    assert!(a.file("/app/m0.js").is_some() && a.file("/app/m5.js").is_some());
    assert!(
        a.notes.iter().any(|n| n.message.contains("too many")),
        "{:?}",
        a.notes
    );
    let a = img
        .analyze(&config(
            &["python3.11", "/app/main.py"],
            &[],
            &["PATH=/usr/bin"],
            "/",
        ))
        .await;
    assert!(a.file("/app/mod0.py").is_some());
    assert!(a.files.len() < 2000, "{}", a.files.len());
}
