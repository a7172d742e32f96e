//! Interoperability with an independent client: the image goes to the registry with
//! `crane push` (an OCI layout), and crane reads back what we wrote (the artifact manifest
//! and the referrers tag-schema index).

mod common;

use std::process::Command;

use talaria_artifact::build::{self, BuildOptions};
use talaria_artifact::format::{self, Knobs, Profile};
use talaria_artifact::oci::store::open_reference;
use talaria_artifact::oci::{self, Platform};
use talaria_testenv::registry::Registry;

fn crane(args: &[&str]) -> String {
    let bin = talaria_testenv::tool("crane").unwrap();
    let out = Command::new(bin)
        .arg("--insecure")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crane {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crane_pushed_image_and_crane_readable_artifact() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (image, tars) = common::test_image(31);
    image.write_layout(dir.path(), "v1").unwrap();
    let target = format!("{}/interop/app:v1", reg.host());
    crane(&["push", dir.path().to_str().unwrap(), &target]);

    let client = common::client();
    let opened = open_reference(&target, &client, false).unwrap();
    let opts = BuildOptions {
        platform: Platform::host(),
        profile: Profile::StartupLocalV1,
        knobs: Knobs::default(),
        parallelism: 2,
        created: Some("2026-01-01T00:00:00Z".into()),
        recorded: None,
        reuse: Default::default(),
    };
    let s = build::build(opened.store.clone(), "v1", None, &opts)
        .await
        .unwrap();
    assert_eq!(s.image.digest, image.manifest_digest);

    // crane reads the artifact manifest and the tag-schema referrers index.
    let art: serde_json::Value = serde_json::from_str(&crane(&[
        "manifest",
        &format!("{}/interop/app@{}", reg.host(), s.artifact.digest),
    ]))
    .unwrap();
    assert_eq!(art["artifactType"], format::ARTIFACT_TYPE);
    assert_eq!(art["subject"]["digest"], image.manifest_digest.as_str());
    assert_eq!(
        art["annotations"][oci::CREATED],
        "2026-01-01T00:00:00Z",
        "created stamp kept"
    );
    let tag = oci::referrers_tag(&image.manifest_digest).unwrap();
    let idx: serde_json::Value = serde_json::from_str(&crane(&[
        "manifest",
        &format!("{}/interop/app:{tag}", reg.host()),
    ]))
    .unwrap();
    assert_eq!(idx["manifests"][0]["digest"], s.artifact.digest.as_str());
    assert_eq!(idx["manifests"][0]["artifactType"], format::ARTIFACT_TYPE);

    // Every file reads back through the artifact.
    let im = common::image_manifest(opened.store.as_ref(), "v1").await;
    let n = common::check_read_through(
        opened.store.as_ref(),
        opened.store.as_ref(),
        &im,
        &s.artifact.digest,
        &common::unpack_merged(&tars),
    )
    .await;
    assert!(n >= 8);
}
