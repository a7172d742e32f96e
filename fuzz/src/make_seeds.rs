//! Writes the seed corpus of every fuzz target, `<out>/<target>/<name>`: small, synthetic
//! and deterministic (the same bytes every run), so `fuzz/seeds/` can be committed.
//! Usage, from fuzz/ and without the fuzzing flags (see Cargo.toml):
//! `cargo run --no-default-features --bin make_seeds -- seeds`

use std::path::Path;

use bytes::Bytes;
use prost::Message;
use talaria_artifact::format::{ArtifactSpec, IndexedLayer, Knobs, Profile, build_manifest};
use talaria_artifact::index::Compression;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::oci::Descriptor;
use talaria_artifact::startup::pack::{PACK_ZSTD_MEDIA_TYPE, PackCompression, PackWriter};
use talaria_artifact::startup::trace::{LayerTrace, TracedFile};
use talaria_artifact::startup::{
    ByteRange, PlanOptions, StartupTrace, analysis_from_trace, build_plan,
};
use talaria_artifact_fuzz::cri::{AuthConfig, ImageSpec, PullImageRequest};
use talaria_artifact_fuzz::{
    SAMPLE_FILES, TRACE_LAYER, TRACE_UNINDEXED, gzip, sample_elf, sample_index, sample_layer,
};

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: make_seeds <output dir>");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create seed dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    let with = |mode: u8, rest: &[u8]| [&[mode][..], rest].concat();
    let join = |parts: &[&[u8]]| parts.join(&0u8);

    // Layers and indexes.
    let tar = sample_layer();
    let gz = gzip(&tar);
    let ix1k = sample_index(1024);
    let ix4k = sample_index(4096);
    let gz_ix = index_layer(
        &gz[..],
        Compression::Gzip,
        &IndexOptions { span_size: 1024 },
    )
    .expect("index the gzip layer")
    .index;
    put("decode_index", "index-1k", &ix1k.encode());
    put("decode_index", "index-4k", &ix4k.encode());
    put("decode_index", "index-gzip", &gz_ix.encode());
    put("index_layer", "gzip", &with(0, &gz));
    put("index_layer", "tar", &with(1, &tar));
    put("layer_tree", "index", &with(0, &ix1k.encode()));
    put("layer_tree", "tar", &with(1, &tar));

    // A recorded start of the sample layer: its trace, plan and pack.
    let trace = StartupTrace {
        version: 1,
        layers: vec![
            LayerTrace {
                digest: TRACE_LAYER.into(),
                files: SAMPLE_FILES
                    .iter()
                    .enumerate()
                    .map(|(i, p)| TracedFile {
                        path: p.to_string(),
                        first_ms: 10 * (SAMPLE_FILES.len() - i) as u64,
                        ranges: vec![
                            ByteRange { offset: 0, len: 16 },
                            ByteRange {
                                offset: 4000,
                                len: 1000,
                            },
                        ],
                    })
                    .collect(),
            },
            LayerTrace {
                digest: TRACE_UNINDEXED.into(),
                files: vec![TracedFile {
                    path: "etc/os-release".into(),
                    first_ms: 1,
                    ranges: vec![ByteRange {
                        offset: 0,
                        len: 100,
                    }],
                }],
            },
        ],
    };
    let trace_json = serde_json::to_vec_pretty(&trace).expect("trace JSON");
    put("startup_trace", "trace", &trace_json);
    let digests = [TRACE_LAYER.to_string(), TRACE_UNINDEXED.to_string()];
    let analysis = analysis_from_trace(&trace, &digests, &[Some(&ix1k), None]);
    let mut plan = build_plan(
        &analysis,
        &[Some(&ix1k)],
        &PlanOptions {
            profile: "startup-local-v1".into(),
            version: 1,
            budget: 1 << 20,
        },
    );
    let mut packs = Vec::new();
    for compression in [PackCompression::Zstd, PackCompression::Gzip] {
        let mut w = PackWriter::with_compression(vec![TRACE_LAYER.into()], compression);
        for f in &analysis.files {
            let data: Vec<u8> = (0..f.size).map(|i| (i % 251) as u8).collect();
            for r in &f.ranges {
                let (s, e) = (r.offset as usize, (r.offset + r.len) as usize);
                w.add(0, &f.path[1..], f.size, r.offset, &data[s..e])
                    .expect("pack");
            }
        }
        packs.push(w.finish().expect("pack"));
    }
    for ((table, blob), name) in packs.iter().zip(["zstd", "gzip"]) {
        let json = serde_json::to_vec(table).expect("table JSON");
        put("pack_table", name, &with(0, &join(&[&json, blob])));
        put(
            "pack_table",
            &format!("{name}-fixed"),
            &with(1, &join(&[&json, blob])),
        );
    }
    put(
        "pack_table",
        "writer",
        &with(2, b"\x01\x02\x00etc/passwd\x10\x00root:x:0:0::/:/bin/sh"),
    );
    put(
        "startup_plan",
        "plan-predicted",
        &serde_json::to_vec_pretty(&plan).expect("plan JSON"),
    );
    plan.pack = Some(packs[0].0.clone());
    put(
        "startup_plan",
        "plan-recorded",
        &serde_json::to_vec_pretty(&plan).expect("plan JSON"),
    );
    put(
        "startup_plan",
        "reason",
        b"DT_NEEDED libz.so.1 of /usr/lib/x86_64-linux-gnu/libnode.so.108",
    );

    // Artifact manifests: a default one, an accelerated one, a recorded one.
    let blob = |n: u8| Descriptor::new("x", format!("sha256:{}", hex_of(n)), 1000 + n as u64);
    let subject = Descriptor::new(
        "application/vnd.oci.image.manifest.v1+json",
        format!("sha256:{}", hex_of(0xaa)),
        1234,
    );
    let layers = vec![
        IndexedLayer {
            layer_digest: format!("sha256:{}", hex_of(1)),
            index: blob(11),
            windows: Some(blob(12)),
        },
        IndexedLayer {
            layer_digest: format!("sha256:{}", hex_of(2)),
            index: blob(21),
            windows: None,
        },
    ];
    let mut manifests = Vec::new();
    for (profile, plan, recorded, created) in [
        (Profile::Default, false, false, None),
        (
            Profile::StartupLocalV1,
            true,
            false,
            Some("2025-01-02T03:04:05Z"),
        ),
        (
            Profile::StartupLocalV1,
            true,
            true,
            Some("2025-01-02T03:04:05Z"),
        ),
    ] {
        let mut pack = plan.then(|| blob(31));
        if let Some(p) = &mut pack {
            p.media_type = PACK_ZSTD_MEDIA_TYPE.into();
        }
        let raw = build_manifest(ArtifactSpec {
            subject: subject.clone(),
            profile,
            knobs: &Knobs::default(),
            layers: layers.clone(),
            skipped: vec![format!("sha256:{}", hex_of(3))],
            plan: plan.then(|| blob(30)),
            startup_paths: vec!["/bin/app".into(), "/etc/*".into()],
            plan_recorded: recorded,
            pack: recorded.then_some(pack).flatten(),
            created: created.map(str::to_string),
        })
        .expect("manifest");
        manifests.push(raw.bytes);
    }
    for (m, name) in manifests.iter().zip(["default", "accelerated", "recorded"]) {
        put("artifact_manifest", name, m);
    }
    let all: Vec<&[u8]> = manifests.iter().map(Bytes::as_ref).collect();
    put("artifact_manifest", "all", &join(&all));

    // Registry strings.
    for (name, h) in [
        (
            "bearer",
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/app:pull""#,
        ),
        ("basic", r#"Basic realm="Registry Realm""#),
        (
            "error",
            r#"Bearer error="invalid_token", error_description="a \"quoted\" \\ value", realm=x"#,
        ),
    ] {
        put("auth_challenge", name, h.as_bytes());
    }
    for (name, r) in [
        ("hub", "busybox".to_string()),
        ("port-tag", "reg.example:5000/team/app:v1".into()),
        ("digest", format!("ghcr.io/org/app@sha256:{}", hex_of(0x5e))),
        (
            "tag-digest",
            format!("localhost/x/y:1.2@sha256:{}", hex_of(0x77)),
        ),
    ] {
        put("image_ref", name, r.as_bytes());
    }

    // Startup analysis inputs.
    put("elf_headers", "elf64le-x86_64", &sample_elf(true, true, 62));
    put("elf_headers", "elf32be-mips", &sample_elf(false, false, 8));
    put("elf_headers", "elf64be-s390x", &sample_elf(true, false, 22));
    put("elf_headers", "elf32le-arm", &sample_elf(false, true, 40));
    put(
        "shell_script",
        "entrypoint",
        b"#!/bin/sh -e\nexport A=1\ncd /app && exec /bin/app \"$@\" --x=${A:-0}\n",
    );
    put(
        "shell_script",
        "chains",
        b"set -e; export JAVA_HOME=/opt/jdk && cd /app && \\\n FOO=bar exec \"$JAVA_HOME/bin/java\" -jar app.jar > /dev/null 2>&1\n\
          if [ -f /x ]; then . /etc/profile; fi\nnohup command python3 -u '$HOME' $1 ${2} ${X-def} | tee log &\n",
    );
    put(
        "shell_script",
        "env-s",
        b"#!/usr/bin/env -S -i A=1 node --max-old-space-size=100\nenv -u X -- ls -l\n",
    );

    // CRI requests through the image-service proxy (first byte: the method).
    let pull = |image: &str, auth: Option<AuthConfig>| {
        PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
            }),
            auth,
        }
        .encode_to_vec()
    };
    let basic = AuthConfig {
        username: "u".into(),
        password: "p".into(),
        ..Default::default()
    };
    let field = AuthConfig {
        auth: "dTpwOnE=".into(),
        server_address: "reg.example:5000".into(),
        ..Default::default()
    };
    let token = AuthConfig {
        registry_token: "t".into(),
        identity_token: "i".into(),
        ..Default::default()
    };
    put(
        "cri_pull",
        "pull-basic",
        &with(0, &pull("reg.example:5000/team/app:v1", Some(basic))),
    );
    put(
        "cri_pull",
        "pull-auth-field",
        &with(0, &pull("ghcr.io/o/a:latest", Some(field))),
    );
    put(
        "cri_pull",
        "pull-token",
        &with(1, &pull("busybox", Some(token))),
    );
    put(
        "cri_pull",
        "pull-anonymous",
        &with(0, &pull("busybox:1.36", None)),
    );
    put("cri_pull", "image-status", &with(2, &pull("busybox", None)));
    put("cri_pull", "unknown-method", &with(3, b""));
}

/// 64 hex digits made of one byte.
fn hex_of(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}
