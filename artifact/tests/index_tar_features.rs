//! Every tar feature the index covers: PAX and GNU long names, PAX overrides and xattrs,
//! ustar prefixes, hardlinks, symlinks, devices, fifos, overlay whiteouts and opaque dirs —
//! from crafted archives and from archives GNU tar writes.

mod index_common;

use std::process::Command;

use index_common::*;
use talaria_artifact::index::{Compression, EntryKind};

#[test]
fn crafted_archive_features() {
    let long_dir = "d".repeat(90);
    let long_path = format!("{long_dir}/{}/file-with-a-long-name.txt", "e".repeat(60));
    let gnu_path = format!("{long_dir}/{}/gnu-long-name.bin", "g".repeat(70));
    let gnu_link = format!("{}/target", "t".repeat(120));
    let pax_content = b"content behind a PAX header".to_vec();
    let gnu_content = vec![7u8; 3000];
    let mut t = RawTar::default();
    t.entry(
        &H {
            name: b"./",
            typeflag: b'5',
            mode: 0o755,
            ..H::default()
        },
        b"",
    )
    .pax(&[
        ("path", long_path.as_bytes()),
        ("SCHILY.xattr.user.mime", b"text/plain"),
        ("SCHILY.xattr.security.capability", &[1, 0, 0, 2, 0xff]),
        ("uid", b"123456789"),
        ("gname", b"paxgroup"),
        ("mtime", b"1234567890.5"),
        ("atime", b"1"),
    ])
    .entry(
        &H {
            name: b"truncated-name",
            size: pax_content.len() as u64,
            ..H::default()
        },
        &pax_content,
    )
    .gnu_long(b'L', &gnu_path)
    .entry(
        &H {
            name: b"short",
            size: gnu_content.len() as u64,
            mode: 0o4755,
            ..H::default()
        },
        &gnu_content,
    )
    .gnu_long(b'K', &gnu_link)
    .entry(
        &H {
            name: b"link-with-long-target",
            typeflag: b'2',
            ..H::default()
        },
        b"",
    )
    .pax(&[("linkpath", b"/abs/pax/target")])
    .entry(
        &H {
            name: b"paxlink",
            typeflag: b'2',
            link: b"ignored",
            ..H::default()
        },
        b"",
    )
    .entry(
        &H {
            name: b"file.txt",
            prefix: b"usr/share/prefixed",
            size: 5,
            ..H::default()
        },
        b"hello",
    )
    .entry(
        &H {
            name: b"./hard",
            typeflag: b'1',
            link: b"./usr/share/prefixed/file.txt",
            ..H::default()
        },
        b"",
    )
    .entry(
        &H {
            name: b"dev/null",
            typeflag: b'3',
            major: 1,
            minor: 3,
            mode: 0o666,
            ..H::default()
        },
        b"",
    )
    .entry(
        &H {
            name: b"dev/sda",
            typeflag: b'4',
            major: 8,
            minor: 0,
            ..H::default()
        },
        b"",
    )
    .entry(
        &H {
            name: b"run/fifo",
            typeflag: b'6',
            ..H::default()
        },
        b"",
    )
    .file("/etc/.wh.removed", b"")
    .file("var/lib/.wh..wh..opq", b"")
    .file(".wh.toplevel", b"")
    .file("aufs/.wh..wh.plnk", b"");
    let tar_bytes = t.finish();

    for (blob, c) in [
        (gzip_cmd(&tar_bytes), Compression::Gzip),
        (tar_bytes.clone(), Compression::None),
    ] {
        let out = index(&blob, c, 4096);
        let ix = out.index;
        let kinds: Vec<(&str, EntryKind)> = ix
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("", EntryKind::Dir),
                (long_path.as_str(), EntryKind::File),
                (gnu_path.as_str(), EntryKind::File),
                ("link-with-long-target", EntryKind::Symlink),
                ("paxlink", EntryKind::Symlink),
                ("usr/share/prefixed/file.txt", EntryKind::File),
                ("hard", EntryKind::Hardlink),
                ("dev/null", EntryKind::Char),
                ("dev/sda", EntryKind::Block),
                ("run/fifo", EntryKind::Fifo),
                ("etc/removed", EntryKind::Whiteout),
                ("var/lib", EntryKind::OpaqueDir),
                ("toplevel", EntryKind::Whiteout),
                ("aufs/.wh..wh.plnk", EntryKind::File),
            ]
        );
        let pax = ix.find(&long_path).unwrap();
        assert_eq!(pax.uid, 123456789);
        assert_eq!(pax.gid, 1000);
        assert_eq!(pax.uname.as_deref(), Some("user"));
        assert_eq!(pax.gname.as_deref(), Some("paxgroup"));
        assert_eq!(pax.mtime, 1234567890);
        assert_eq!(
            pax.xattrs,
            vec![
                ("user.mime".to_string(), b"text/plain".to_vec()),
                ("security.capability".to_string(), vec![1, 0, 0, 2, 0xff]),
            ]
        );
        let gnu = ix.find(&gnu_path).unwrap();
        assert_eq!(gnu.mode, 0o4755);
        assert_eq!(gnu.size, 3000);
        assert_eq!(
            ix.find("link-with-long-target")
                .unwrap()
                .link_target
                .as_deref(),
            Some(gnu_link.as_str())
        );
        assert_eq!(
            ix.find("paxlink").unwrap().link_target.as_deref(),
            Some("/abs/pax/target")
        );
        assert_eq!(
            ix.find("/hard").unwrap().link_target.as_deref(),
            Some("usr/share/prefixed/file.txt")
        );
        let null = ix.find("./dev/null").unwrap();
        assert_eq!((null.dev_major, null.dev_minor, null.mode), (1, 3, 0o666));
        let sda = ix.find("dev/sda").unwrap();
        assert_eq!((sda.dev_major, sda.dev_minor), (8, 0));
        assert!(ix.find("etc/.wh.removed").is_none());

        let dec = talaria_artifact::index::LayerIndex::decode(&ix.encode()).unwrap();
        assert_eq!(dec, ix);
        let r = reader(dec, &blob);
        block_on(async {
            let e = r.index().find(&long_path).unwrap().clone();
            assert_eq!(
                &r.read_file(&e, 0, 1 << 20).await.unwrap()[..],
                &pax_content[..]
            );
            let e = r.index().find(&gnu_path).unwrap().clone();
            assert_eq!(
                &r.read_file(&e, 0, 1 << 20).await.unwrap()[..],
                &gnu_content[..]
            );
            let e = r
                .index()
                .find("usr/share/prefixed/file.txt")
                .unwrap()
                .clone();
            assert_eq!(&r.read_file(&e, 1, 3).await.unwrap()[..], b"ell");
            let e = r.index().find("hard").unwrap().clone();
            assert!(r.read_file(&e, 0, 1).await.is_err());
        });
    }
}

#[test]
fn gnu_tar_formats() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let deep = root.join("a".repeat(80)).join("b".repeat(80));
    std::fs::create_dir_all(&deep).unwrap();
    let long_file = deep.join(format!("{}.txt", "c".repeat(100)));
    std::fs::write(&long_file, b"long file content").unwrap();
    std::fs::write(root.join("plain"), vec![42u8; 100_000]).unwrap();
    std::fs::hard_link(root.join("plain"), root.join("plain-hardlink")).unwrap();
    std::os::unix::fs::symlink("plain", root.join("sym")).unwrap();
    let sh = |cmd: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(root)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd}");
    };
    sh("mkfifo fifo");
    sh("mknod chardev c 1 7");
    let xattrs = Command::new("sh")
        .arg("-c")
        .arg("command -v setfattr >/dev/null && setfattr -n user.talaria -v yes plain")
        .current_dir(root)
        .status()
        .unwrap()
        .success();
    let rel_long = long_file
        .strip_prefix(root)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    for format in ["gnu", "pax", "ustar"] {
        let mut args = vec![
            "-C".to_string(),
            root.to_str().unwrap().to_string(),
            format!("--format={format}"),
            "--sort=name".into(),
        ];
        if format == "pax" {
            args.push("--xattrs".into());
            args.push("--xattrs-include=user.*".into());
        }
        args.extend(["-cf", "-", "."].map(String::from));
        let out = Command::new("tar").args(&args).output().unwrap();
        if format == "ustar" {
            // ustar cannot hold the 270-byte path: GNU tar refuses it.
            continue;
        }
        assert!(out.status.success(), "tar {format}");
        let tar_bytes = out.stdout;
        let blob = gzip_cmd(&tar_bytes);
        let ix = index(&blob, Compression::Gzip, 4096).index;
        let e = ix
            .find(&rel_long)
            .unwrap_or_else(|| panic!("{format}: {rel_long}"));
        assert_eq!(e.kind, EntryKind::File);
        assert_eq!(ix.find("fifo").unwrap().kind, EntryKind::Fifo);
        let c = ix.find("chardev").unwrap();
        assert_eq!((c.kind, c.dev_major, c.dev_minor), (EntryKind::Char, 1, 7));
        assert_eq!(
            ix.find("sym").unwrap().link_target.as_deref(),
            Some("plain")
        );
        let h = ix.find("plain-hardlink").unwrap();
        assert_eq!(h.kind, EntryKind::Hardlink);
        assert_eq!(h.link_target.as_deref(), Some("plain"));
        assert_eq!(ix.find("").unwrap().kind, EntryKind::Dir);
        if format == "pax" && xattrs {
            assert_eq!(
                ix.find("plain").unwrap().xattrs,
                vec![("user.talaria".to_string(), b"yes".to_vec())]
            );
        }
        let r = reader(ix, &blob);
        block_on(async {
            let e = r.index().find(&rel_long).unwrap().clone();
            assert_eq!(
                &r.read_file(&e, 0, 100).await.unwrap()[..],
                b"long file content"
            );
            let e = r.index().find("plain").unwrap().clone();
            assert_eq!(
                r.read_file(&e, 0, 1 << 20).await.unwrap(),
                vec![42u8; 100_000]
            );
        });
    }
}
