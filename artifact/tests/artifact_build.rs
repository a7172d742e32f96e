//! Build → resolve → read every file through the artifact, against the real registry
//! (distribution 2.8, no referrers API: the tag schema is used) and an OCI layout.

mod common;

use std::sync::Arc;

use talaria_artifact::build::{self, BuildOptions};
use talaria_artifact::discover;
use talaria_artifact::format::{self, Knobs, Profile};
use talaria_artifact::index::{INDEX_MEDIA_TYPE, WINDOWS_MEDIA_TYPE};
use talaria_artifact::oci::layout::OciLayout;
use talaria_artifact::oci::registry::ImageRef;
use talaria_artifact::oci::store::{LayoutStore, RegistryStore, Store, open_reference};
use talaria_artifact::oci::{self, Manifest, Platform};
use talaria_artifact::startup::plan::StartupPlan;
use talaria_testenv::registry::Registry;

fn opts(profile: Profile) -> BuildOptions {
    BuildOptions {
        platform: Platform::host(),
        profile,
        knobs: Knobs {
            // Small spans: every big file crosses several checkpoints.
            span_size: 256 * 1024,
            ..Knobs::default()
        },
        parallelism: 2,
        created: None,
        recorded: None,
        reuse: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_build_resolve_read_every_file() {
    let reg = Registry::start().unwrap();
    let (image, tars) = common::test_image(1);
    image.push(&reg.host(), "app/multi", "v1").unwrap();
    let expected = common::unpack_merged(&tars);

    let client = common::client();
    let opened = open_reference(&format!("{}/app/multi:v1", reg.host()), &client, false).unwrap();
    let store = opened.store.clone();

    // Nothing yet.
    assert!(
        discover::resolve(store.as_ref(), &image.manifest_digest)
            .await
            .unwrap()
            .is_none()
    );

    let default = build::build(
        store.clone(),
        &opened.reference,
        None,
        &opts(Profile::Default),
    )
    .await
    .unwrap();
    assert!(!default.adopted);
    assert_eq!(default.image.digest, image.manifest_digest);
    assert_eq!(default.layers.len(), 3);
    assert!(
        default
            .layers
            .iter()
            .all(|l| l.index.is_some() && l.spans >= 1)
    );
    assert!(default.plan.is_none());

    // The default artifact resolves while it is the only one.
    let got = discover::resolve(store.as_ref(), &image.manifest_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.descriptor.digest, default.artifact.digest);
    assert_eq!(got.profile, "default");

    let accel = build::build(
        store.clone(),
        &opened.reference,
        None,
        &opts(Profile::StartupLocalV1),
    )
    .await
    .unwrap();
    assert_ne!(accel.artifact.digest, default.artifact.digest);
    assert!(accel.plan.is_some());
    for l in &accel.layers {
        eprintln!(
            "layer {}: {} B compressed, {} B tar, {} entries, {} spans, index {} B, {:?}",
            &l.digest[..19],
            l.compressed_size,
            l.uncompressed_size,
            l.entries,
            l.spans,
            l.index.as_ref().map_or(0, |d| d.size),
            l.duration
        );
    }
    // Index blobs are content-addressed and shared between the two artifacts.
    let idx = |s: &build::BuildSummary| {
        s.layers
            .iter()
            .map(|l| l.index.clone().unwrap().digest)
            .collect::<Vec<_>>()
    };
    assert_eq!(idx(&default), idx(&accel));

    // Resolution prefers the accelerated artifact.
    let best = discover::resolve(store.as_ref(), &image.manifest_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(best.descriptor.digest, accel.artifact.digest);
    assert!(best.is_accelerated());
    assert_eq!(best.key, accel.key);

    // The tag-schema index lists both, with artifactType and annotations.
    let tag = oci::referrers_tag(&image.manifest_digest).unwrap();
    let ti = store.get_manifest(&tag).await.unwrap();
    let Manifest::Index(ti) = ti.parse().unwrap() else {
        panic!("tag schema entry is not an index")
    };
    assert_eq!(ti.manifests.len(), 2);
    assert!(ti.manifests.iter().all(
        |d| d.artifact_type.as_deref() == Some(format::ARTIFACT_TYPE)
            && d.annotation(format::ANN_KEY).is_some()
    ));

    // The artifact manifest is what DESIGN §2 says.
    let raw = store.get_manifest(&accel.artifact.digest).await.unwrap();
    let Manifest::Image(m) = raw.parse().unwrap() else {
        panic!()
    };
    assert_eq!(m.config.digest, oci::EMPTY_DIGEST);
    assert_eq!(m.subject.as_ref().unwrap().digest, image.manifest_digest);
    // Three indexes (each followed by its windows blob when it has windows), then the plan.
    let (plan_desc, blobs) = m.layers.split_last().unwrap();
    let n_index = blobs
        .iter()
        .filter(|l| l.media_type == INDEX_MEDIA_TYPE)
        .count();
    assert_eq!(n_index, 3);
    assert!(
        blobs
            .iter()
            .all(|l| l.media_type == INDEX_MEDIA_TYPE || l.media_type == WINDOWS_MEDIA_TYPE)
    );
    assert_eq!(plan_desc.media_type, format::STARTUP_PLAN_MEDIA_TYPE);
    let plan: StartupPlan =
        serde_json::from_slice(&store.get_blob(&plan_desc.digest, 1 << 20).await.unwrap()).unwrap();
    assert_eq!(plan.version, 1);
    // The entrypoint (/bin/sh -> tool) is in the plan, in the layer that wins (layer 2
    // overwrote bin/tool), and the annotation lists the startup paths.
    assert!(
        plan.entries
            .iter()
            .any(|e| e.path.trim_start_matches('/') == "bin/tool" && e.layer == 2),
        "{plan:?}"
    );
    assert_eq!(best.startup_paths, plan.paths);
    assert!(
        best.startup_paths.iter().any(|p| p == "/bin/sh"),
        "{:?}",
        best.startup_paths
    );

    // Every file read lazily through the artifact equals the full unpack.
    let im = common::image_manifest(store.as_ref(), &image.manifest_digest).await;
    let n = common::check_read_through(
        store.as_ref(),
        store.as_ref(),
        &im,
        &accel.artifact.digest,
        &expected,
    )
    .await;
    assert!(n >= 8, "compared {n} files");

    // A second build adopts the artifact.
    let again = build::build(
        store.clone(),
        &opened.reference,
        None,
        &opts(Profile::StartupLocalV1),
    )
    .await
    .unwrap();
    assert!(again.adopted);
    assert_eq!(again.artifact.digest, accel.artifact.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_builds_make_one_artifact_and_a_consistent_index() {
    let reg = Registry::start().unwrap();
    let (image, _) = common::test_image(2);
    image.push(&reg.host(), "app/race", "v1").unwrap();
    let client = common::client();
    let r = ImageRef::parse(&format!("{}/app/race:v1", reg.host())).unwrap();
    let mk =
        || Arc::new(RegistryStore::new(client.clone(), r.repository.clone())) as Arc<dyn Store>;

    // Two builds of one key, and two of another key, all at once (separate tasks and
    // stores, like separate controller workers).
    let spawn = |p: Profile| {
        let st = mk();
        tokio::spawn(async move { build::build(st, "v1", None, &opts(p)).await })
    };
    let (ha, hb, hc, hd) = (
        spawn(Profile::StartupLocalV1),
        spawn(Profile::StartupLocalV1),
        spawn(Profile::Default),
        spawn(Profile::Default),
    );
    let a = ha.await.unwrap().unwrap();
    let b = hb.await.unwrap().unwrap();
    let c = hc.await.unwrap().unwrap();
    let d = hd.await.unwrap().unwrap();
    assert_eq!(a.artifact.digest, b.artifact.digest);
    assert_eq!(c.artifact.digest, d.artifact.digest);
    assert_ne!(a.artifact.digest, c.artifact.digest);

    let store = mk();
    let list = discover::list_artifacts(store.as_ref(), &image.manifest_digest)
        .await
        .unwrap();
    let mut digests: Vec<_> = list.iter().map(|x| x.descriptor.digest.clone()).collect();
    digests.sort();
    let mut want = vec![a.artifact.digest.clone(), c.artifact.digest.clone()];
    want.sort();
    assert_eq!(digests, want, "exactly one artifact per key, none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_builds_the_requested_platform() {
    let reg = Registry::start().unwrap();
    let (image, tars) = common::test_image(3);
    // A second platform: the same layers with another architecture in the config.
    let other_arch = if Platform::host().architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let mut cfg: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
    cfg["architecture"] = serde_json::json!(other_arch);
    let cfg2 = serde_json::to_vec(&cfg).unwrap();
    let mut man: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    man["config"]["digest"] = serde_json::json!(oci::sha256_digest(&cfg2));
    man["config"]["size"] = serde_json::json!(cfg2.len());
    let man2 = serde_json::to_vec(&man).unwrap();
    let man2_digest = oci::sha256_digest(&man2);

    let host = reg.host();
    image.push(&host, "app/mp", "host-only").unwrap();
    talaria_testenv::images::push_blob(&host, "app/mp", &cfg2).unwrap();
    let put = |reference: &str, body: &[u8], ct: &str| {
        let r = talaria_testenv::http::request(
            &host,
            "PUT",
            &format!("/v2/app/mp/manifests/{reference}"),
            &[("Content-Type", ct)],
            body,
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    };
    put(&man2_digest, &man2, oci::OCI_MANIFEST);
    let host_p = Platform::host();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [
            {"mediaType": oci::OCI_MANIFEST, "digest": man2_digest, "size": man2.len(),
             "platform": {"os": "linux", "architecture": other_arch}},
            {"mediaType": oci::OCI_MANIFEST, "digest": image.manifest_digest, "size": image.manifest.len(),
             "platform": {"os": "linux", "architecture": host_p.architecture}},
        ]
    });
    put(
        "multi",
        &serde_json::to_vec(&index).unwrap(),
        oci::OCI_INDEX,
    );

    let client = common::client();
    let opened = open_reference(&format!("{host}/app/mp:multi"), &client, false).unwrap();
    let s = build::build(opened.store.clone(), "multi", None, &opts(Profile::Default))
        .await
        .unwrap();
    assert_eq!(s.image.digest, image.manifest_digest);

    let mut o = opts(Profile::Default);
    o.platform = Platform::parse(&format!("linux/{other_arch}")).unwrap();
    let s2 = build::build(opened.store.clone(), "multi", None, &o)
        .await
        .unwrap();
    assert_eq!(s2.image.digest, man2_digest);
    assert_ne!(s2.artifact.digest, s.artifact.digest);

    let mut bad = opts(Profile::Default);
    bad.platform = Platform::parse("linux/s390x").unwrap();
    let err = build::build(opened.store.clone(), "multi", None, &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("linux/s390x"), "{err}");

    let im = common::image_manifest(opened.store.as_ref(), &man2_digest).await;
    let n = common::check_read_through(
        opened.store.as_ref(),
        opened.store.as_ref(),
        &im,
        &s2.artifact.digest,
        &common::unpack_merged(&tars),
    )
    .await;
    assert!(n > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_store_build_resolve_read() {
    let dir = tempfile::tempdir().unwrap();
    let (image, tars) = common::test_image(4);
    image.write_layout(dir.path(), "v1").unwrap();
    let client = common::client();
    let opened =
        open_reference(&format!("oci:{}:v1", dir.path().display()), &client, false).unwrap();
    let s = build::build(
        opened.store.clone(),
        &opened.reference,
        None,
        &opts(Profile::StartupLocalV1),
    )
    .await
    .unwrap();
    let best = discover::resolve(opened.store.as_ref(), &image.manifest_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(best.descriptor.digest, s.artifact.digest);
    // The artifact is listed in index.json with its type, and found again by a fresh store.
    let layout = OciLayout::open(dir.path()).unwrap();
    let idx = layout.read_index().unwrap();
    assert!(idx.manifests.iter().any(|d| d.digest == s.artifact.digest
        && d.artifact_type.as_deref() == Some(format::ARTIFACT_TYPE)));
    let fresh = LayoutStore::new(layout);
    let im = common::image_manifest(&fresh, "v1").await;
    let n = common::check_read_through(
        &fresh,
        &fresh,
        &im,
        &s.artifact.digest,
        &common::unpack_merged(&tars),
    )
    .await;
    assert!(n >= 8);

    // An artifact stored elsewhere (a separate layout) for a layout image.
    let dir2 = tempfile::tempdir().unwrap();
    let art_store: Arc<dyn Store> = Arc::new(LayoutStore::new(
        OciLayout::open_or_create(dir2.path()).unwrap(),
    ));
    let s2 = build::build(
        opened.store.clone(),
        "v1",
        Some(art_store.clone()),
        &opts(Profile::Default),
    )
    .await
    .unwrap();
    assert!(
        discover::find_by_key(art_store.as_ref(), &image.manifest_digest, &s2.key)
            .await
            .unwrap()
            .is_some()
    );
    // Referrers are found by scanning manifests even without the index.json entry.
    let l2 = OciLayout::open(dir2.path()).unwrap();
    l2.update_index(|list| list.clear()).unwrap();
    let refs = l2.referrers(&image.manifest_digest).unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest, s2.artifact.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_threshold_records_skipped_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = common::test_image(5);
    image.write_layout(dir.path(), "v1").unwrap();
    let store: Arc<dyn Store> = Arc::new(LayoutStore::new(OciLayout::open(dir.path()).unwrap()));
    let smallest = image.layers.iter().map(|l| l.blob.len()).min().unwrap() as u64;
    let mut o = opts(Profile::Default);
    o.knobs.skip_threshold = smallest + 1;
    let s = build::build(store.clone(), "v1", None, &o).await.unwrap();
    let skipped: Vec<_> = s.layers.iter().filter(|l| l.skipped.is_some()).collect();
    assert_eq!(skipped.len(), 1);
    let info = discover::find_by_key(store.as_ref(), &image.manifest_digest, &s.key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.skipped, vec![skipped[0].digest.clone()]);
    assert!(info.index_for(&skipped[0].digest).is_none());
    assert_eq!(info.layers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_manifest_list_and_manifest() {
    let reg = Registry::start().unwrap();
    let host = reg.host();
    let (image, tars) = common::test_image(6);
    // Push the blobs with the independent test helper, then Docker-typed manifests.
    image.push(&host, "app/docker", "oci").unwrap();
    let mut man: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    man["mediaType"] = serde_json::json!(oci::DOCKER_MANIFEST);
    man["config"]["mediaType"] =
        serde_json::json!("application/vnd.docker.container.image.v1+json");
    for l in man["layers"].as_array_mut().unwrap() {
        l["mediaType"] = serde_json::json!("application/vnd.docker.image.rootfs.diff.tar.gzip");
    }
    let man = serde_json::to_vec(&man).unwrap();
    let man_digest = oci::sha256_digest(&man);
    let put = |reference: &str, body: &[u8], ct: &str| {
        let r = talaria_testenv::http::request(
            &host,
            "PUT",
            &format!("/v2/app/docker/manifests/{reference}"),
            &[("Content-Type", ct)],
            body,
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    };
    put(&man_digest, &man, oci::DOCKER_MANIFEST);
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::DOCKER_LIST,
        "manifests": [{"mediaType": oci::DOCKER_MANIFEST, "digest": man_digest, "size": man.len(),
                       "platform": {"os": "linux", "architecture": Platform::host().architecture}}]
    });
    put(
        "list",
        &serde_json::to_vec(&list).unwrap(),
        oci::DOCKER_LIST,
    );

    let client = common::client();
    let opened = open_reference(&format!("{host}/app/docker:list"), &client, false).unwrap();
    let raw = opened.store.get_manifest("list").await.unwrap();
    assert_eq!(raw.media_type, oci::DOCKER_LIST);
    let s = build::build(opened.store.clone(), "list", None, &opts(Profile::Default))
        .await
        .unwrap();
    assert_eq!(s.image.digest, man_digest);
    assert_eq!(s.image.media_type, oci::DOCKER_MANIFEST);
    assert!(s.layers.iter().all(|l| l.index.is_some()));
    let im = common::image_manifest(opened.store.as_ref(), &man_digest).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accelerated_build_reuses_the_indexes_of_the_default_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = common::test_image(6);
    image.write_layout(dir.path(), "v1").unwrap();
    let store: Arc<dyn Store> = Arc::new(LayoutStore::new(OciLayout::open(dir.path()).unwrap()));
    let default = build::build(store.clone(), "v1", None, &opts(Profile::Default))
        .await
        .unwrap();

    // With the layer blobs gone, only reuse can index the layers.
    for l in &image.layers {
        let hex = l.digest.strip_prefix("sha256:").unwrap();
        std::fs::remove_file(dir.path().join("blobs/sha256").join(hex)).unwrap();
    }
    let accel = build::build(store.clone(), "v1", None, &opts(Profile::StartupLocalV1))
        .await
        .expect("the accelerated build reuses the default artifact's indexes");
    assert!(!accel.adopted);
    assert_ne!(accel.key, default.key);
    let idx = |s: &build::BuildSummary| -> Vec<_> {
        s.layers
            .iter()
            .map(|l| l.index.clone().map(|d| d.digest))
            .collect()
    };
    assert_eq!(idx(&accel), idx(&default));
    // The windows blobs are reused with their indexes (and read back for the plan).
    let win = |s: &build::BuildSummary| -> Vec<_> {
        s.layers
            .iter()
            .map(|l| l.windows.clone().map(|d| d.digest))
            .collect()
    };
    assert!(
        win(&default).iter().any(Option::is_some),
        "some layer has windows"
    );
    assert_eq!(win(&accel), win(&default));

    // Other span sizes make other indexes: nothing to reuse, so the missing layers fail it.
    let mut other = opts(Profile::StartupLocalV1);
    other.knobs.span_size *= 2;
    assert!(
        build::build(store.clone(), "v1", None, &other)
            .await
            .is_err()
    );
}
