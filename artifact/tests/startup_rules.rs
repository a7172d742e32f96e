//! One image per runtime rule (JVM, Python, Node, shells, system files), built with
//! talaria-testenv; executables are real ELF files of this machine so the ELF closure is
//! followed for real, the runtime files are small stand-ins at their real paths.

mod startup_common;

use startup_common::{HostTree, TestImage, config, host_real, paths};
use talaria_artifact::startup::FileClass;
use talaria_testenv::images::{self, LayerBuilder};

const ELF: &str = "/usr/bin/env";
const LIB: &str = "/lib/x86_64-linux-gnu/libm.so.6";

fn base() -> Option<LayerBuilder> {
    let need = [
        "/bin/sh",
        ELF,
        LIB,
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d/x86_64-linux-gnu.conf",
    ];
    if !need.iter().all(|p| std::path::Path::new(p).exists()) {
        eprintln!("skipping: this machine lacks some of {need:?}");
        return None;
    }
    let mut t = HostTree::default();
    for p in need {
        t.add(p);
    }
    Some(t.layer())
}

fn read_host(p: &str) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn assert_has(got: &[&str], want: &[&str]) {
    for w in want {
        assert!(got.contains(w), "{w} missing from {got:#?}");
    }
}

#[tokio::test]
async fn jvm_rule_via_sh_c_and_java_home() {
    let Some(base) = base() else { return };
    let jdk = "opt/jdk";
    let app = LayerBuilder::new()
        .dir("opt", 0o755)
        .dir(jdk, 0o755)
        .dir("opt/jdk/bin", 0o755)
        .dir("opt/jdk/lib", 0o755)
        .dir("opt/jdk/lib/server", 0o755)
        .dir("opt/jdk/conf/security", 0o755)
        .file("opt/jdk/bin/java", read_host(ELF), 0o755)
        .file("opt/jdk/lib/server/libjvm.so", read_host(LIB), 0o755)
        .file("opt/jdk/lib/libjava.so", read_host(LIB), 0o755)
        .file("opt/jdk/lib/jvm.cfg", "-server KNOWN\n", 0o644)
        .file("opt/jdk/lib/modules", vec![7u8; 300_000], 0o644)
        .file("opt/jdk/lib/tzdb.dat", "tzdb", 0o644)
        .file("opt/jdk/lib/security/cacerts", "certs", 0o644)
        .file("opt/jdk/conf/security/java.security", "sec", 0o644)
        .file("opt/jdk/lib/unrelated.txt", "no", 0o644)
        .dir("app", 0o755)
        .dir("app/lib", 0o755)
        .file("app/lib/a.jar", "PK", 0o644)
        .file("app/lib/b.jar", "PK", 0o644)
        .file("app/lib/readme", "no", 0o644);
    let img = TestImage::new(vec![base, app], 64 * 1024);
    let cfg = config(
        &["/bin/sh", "-c"],
        &["set -e; cd /app && exec \"$JAVA_HOME/bin/java\" -Xmx1g -cp 'lib/*' com.example.Main"],
        &["JAVA_HOME=/opt/jdk", "PATH=/usr/bin:/bin"],
        "/",
    );
    let a = img.analyze(&cfg).await;
    let got = paths(&a);
    assert_has(
        &got,
        &[
            "/opt/jdk/bin/java",
            "/opt/jdk/lib/jvm.cfg",
            "/opt/jdk/lib/server/libjvm.so",
            "/opt/jdk/lib/libjava.so",
            "/opt/jdk/lib/modules",
            "/opt/jdk/lib/tzdb.dat",
            "/opt/jdk/lib/security/cacerts",
            "/opt/jdk/conf/security/java.security",
            "/app/lib/a.jar",
            "/app/lib/b.jar",
        ],
    );
    assert!(!got.contains(&"/opt/jdk/lib/unrelated.txt"));
    assert!(!got.contains(&"/app/lib/readme"));
    assert_eq!(
        a.file("/opt/jdk/lib/modules").unwrap().class,
        FileClass::Runtime
    );
    // The shell ran first.
    assert_eq!(got[0], host_real("/bin/sh"));
    assert!(a.notes.is_empty(), "{:#?}", a.notes);

    // -jar, relative to WorkingDir.
    let app2 = LayerBuilder::new()
        .dir("opt", 0o755)
        .dir("opt/jdk/bin", 0o755)
        .file("opt/jdk/bin/java", read_host(ELF), 0o755)
        .dir("srv", 0o755)
        .file("srv/app.jar", "PK", 0o644);
    let img = TestImage::new(vec![base_or_skip(), app2], 64 * 1024);
    let cfg = config(&["/opt/jdk/bin/java", "-jar", "app.jar"], &[], &[], "/srv");
    let a = img.analyze(&cfg).await;
    assert!(paths(&a).contains(&"/srv/app.jar"));
    // A JVM without libjvm says so.
    assert!(
        a.notes.iter().any(|n| n.message.contains("libjvm")),
        "{:?}",
        a.notes
    );
}

fn base_or_skip() -> LayerBuilder {
    base().expect("checked by the caller")
}

#[tokio::test]
async fn python_rule_stdlib_script_and_imports() {
    let Some(base) = base() else { return };
    let py = LayerBuilder::new()
        .dir("usr/lib/python3.11", 0o755)
        .dir("usr/lib/python3.11/encodings", 0o755)
        .dir("usr/lib/python3.11/encodings/__pycache__", 0o755)
        .dir("usr/lib/python3.11/json", 0o755)
        .dir("usr/lib/python3.11/lib-dynload", 0o755)
        .dir("usr/lib/python3/dist-packages", 0o755)
        .file("usr/bin/python3.11", read_host(ELF), 0o755)
        .symlink("usr/bin/python3", "python3.11")
        .file("usr/lib/python3.11/os.py", "import abc\n", 0o644)
        .file("usr/lib/python3.11/site.py", "import os\n", 0o644)
        .file("usr/lib/python3.11/abc.py", "", 0o644)
        .file("usr/lib/python3.11/encodings/__init__.py", "import codecs\n", 0o644)
        .file(
            "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
            "pyc",
            0o644,
        )
        .file("usr/lib/python3.11/codecs.py", "", 0o644)
        .file("usr/lib/python3.11/json/__init__.py", "from .decoder import x\nimport re\n", 0o644)
        .file("usr/lib/python3.11/re.py", "import enum\n", 0o644)
        .file("usr/lib/python3.11/enum.py", "", 0o644)
        .file("usr/lib/python3.11/unused.py", "", 0o644)
        .file(
            "usr/lib/python3.11/lib-dynload/_ext.cpython-311-x86_64-linux-gnu.so",
            read_host(LIB),
            0o644,
        )
        .file("usr/lib/python3/dist-packages/distutils-precedence.pth", "x", 0o644)
        .dir("app", 0o755)
        .dir("app/mypkg", 0o755)
        .file(
            "app/main.py",
            "import json\nfrom mypkg import util\nimport _ext\n\ndef f():\n    import lazy_missing\n",
            0o644,
        )
        .file("app/mypkg/__init__.py", "", 0o644)
        .file("app/mypkg/util.py", "import enum\n", 0o644);
    let img = TestImage::new(vec![base, py], 64 * 1024);
    let cfg = config(&[], &["python3", "-u", "main.py"], &[], "/app");
    let a = img.analyze(&cfg).await;
    let got = paths(&a);
    assert_has(
        &got,
        &[
            "/usr/bin/python3.11",
            "/app/main.py",
            "/usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
            "/usr/lib/python3.11/json/__init__.py",
            "/usr/lib/python3.11/re.py",
            "/usr/lib/python3.11/enum.py",
            "/usr/lib/python3.11/lib-dynload/_ext.cpython-311-x86_64-linux-gnu.so",
            "/usr/lib/python3/dist-packages/distutils-precedence.pth",
            "/app/mypkg/__init__.py",
            "/app/mypkg/util.py",
        ],
    );
    // The cached bytecode is what the interpreter reads, not the source.
    assert!(!got.contains(&"/usr/lib/python3.11/encodings/__init__.py"));
    assert!(!got.contains(&"/usr/lib/python3.11/unused.py"));
    // 3.11 runs site, os, abc, codecs from frozen code: no file is read for them.
    for frozen in ["site.py", "os.py", "abc.py", "codecs.py"] {
        assert!(!got.contains(&format!("/usr/lib/python3.11/{frozen}").as_str()));
    }
    assert!(a.links.contains(&"/usr/bin/python3".to_string()));
    assert!(a.notes.is_empty(), "{:#?}", a.notes);
}

#[tokio::test]
async fn node_rule_package_main_and_requires() {
    let Some(base) = base() else { return };
    let node = LayerBuilder::new()
        .dir("usr/local/bin", 0o755)
        .file("usr/local/bin/node", read_host(ELF), 0o755)
        .dir("srv/app/lib", 0o755)
        .dir("srv/app/node_modules/express", 0o755)
        .file("srv/app/package.json", r#"{"main": "lib/index.js"}"#, 0o644)
        .file(
            "srv/app/lib/index.js",
            "const u = require('./util');\nconst e = require('express');\nconst fs = require('fs');\n",
            0o644,
        )
        .file("srv/app/lib/util.js", "module.exports = 1;\n", 0o644)
        .file("srv/app/lib/unused.js", "", 0o644)
        .file("srv/app/node_modules/express/package.json", r#"{"main": "main.js"}"#, 0o644)
        .file("srv/app/node_modules/express/main.js", "", 0o644);
    let img = TestImage::new(vec![base, node], 64 * 1024);
    let cfg = config(
        &["node"],
        &["/srv/app"],
        &["PATH=/usr/local/bin:/usr/bin"],
        "/",
    );
    let a = img.analyze(&cfg).await;
    let got = paths(&a);
    assert_has(
        &got,
        &[
            "/usr/local/bin/node",
            "/srv/app/package.json",
            "/srv/app/lib/index.js",
            "/srv/app/lib/util.js",
            "/srv/app/node_modules/express/package.json",
            "/srv/app/node_modules/express/main.js",
        ],
    );
    assert!(!got.contains(&"/srv/app/lib/unused.js"));
    assert!(a.notes.is_empty(), "{:#?}", a.notes);
}

#[tokio::test]
async fn system_files_nss_tz_locale_and_layers() {
    let Some(base) = base() else { return };
    let etc = LayerBuilder::new()
        .file(
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n",
            0o644,
        )
        .file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/group", "root:x:0:\n", 0o644)
        .file("etc/ld.so.cache", "cache", 0o644)
        .dir("usr/share/zoneinfo/Europe", 0o755)
        .file("usr/share/zoneinfo/Europe/Paris", "TZif", 0o644)
        .file("usr/share/zoneinfo/UTC", "TZif", 0o644)
        .dir("usr/lib/locale/en_US.utf8", 0o755)
        .file("usr/lib/locale/en_US.utf8/LC_CTYPE", "ctype", 0o644)
        .file("usr/lib/locale/en_US.utf8/LC_TIME", "time", 0o644)
        .file("etc/secret-file", "no", 0o644)
        .dir("app", 0o755)
        .file("app/tool", read_host(ELF), 0o755);
    // A later layer replaces the tool (it must come from layer 2) and deletes /etc/group.
    let top = LayerBuilder::new()
        .dir("app", 0o755)
        .file("app/tool", read_host(ELF), 0o755)
        .whiteout("etc/group");
    let img = TestImage::new(vec![base, etc, top], 64 * 1024);
    let cfg = config(
        &["/app/tool"],
        &[],
        &["TZ=Europe/Paris", "LANG=en_US.UTF-8"],
        "",
    );
    let a = img.analyze(&cfg).await;
    let got = paths(&a);
    assert_has(
        &got,
        &[
            "/etc/nsswitch.conf",
            "/etc/passwd",
            "/etc/ld.so.cache",
            "/usr/share/zoneinfo/Europe/Paris",
            "/usr/lib/locale/en_US.utf8/LC_CTYPE",
            "/usr/lib/locale/en_US.utf8/LC_TIME",
        ],
    );
    assert!(!got.contains(&"/etc/group"), "whited out");
    assert!(!got.contains(&"/etc/secret-file"));
    assert!(!got.contains(&"/usr/share/zoneinfo/UTC"));
    assert_eq!(a.file("/app/tool").unwrap().layer, 2);
    assert_eq!(a.file("/etc/passwd").unwrap().class, FileClass::System);
    assert_eq!(
        a.file("/etc/ld.so.cache").unwrap().class,
        FileClass::Library
    );
    assert_eq!(a.files.last().unwrap().class, FileClass::System);
}

#[tokio::test]
async fn busybox_static_shell_and_script_without_shebang() {
    let Ok(bb) = images::busybox_layer_builder() else {
        eprintln!("skipping: no busybox-static");
        return;
    };
    let app = LayerBuilder::new().dir("app", 0o755).file(
        "app/entry",
        "echo no shebang\nexec sleep 1\n",
        0o755,
    );
    let img = TestImage::new(vec![bb, app], 64 * 1024);
    let cfg = config(&["/app/entry"], &[], &[], "/");
    let a = img.analyze(&cfg).await;
    let got = paths(&a);
    assert_has(&got, &["/app/entry", "/bin/busybox"]);
    assert!(a.links.contains(&"/bin/sh".to_string()));
    assert!(a.links.contains(&"/bin/sleep".to_string()), "{:?}", a.links);
    // Static: no interpreter, no libraries, and that is not a problem.
    assert!(!a.files.iter().any(|f| f.class == FileClass::Library));
    assert!(a.notes.is_empty(), "{:#?}", a.notes);
    let bb = a.file("/bin/busybox").unwrap();
    assert!(
        bb.reasons.iter().any(|r| r.contains("no shebang")),
        "{:?}",
        bb.reasons
    );
}
