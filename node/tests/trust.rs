//! The node's trust rule, with the real kube-apiserver and registry (docs/trust.md): the
//! node watches AcceleratedImages and mounts a layer lazily from the artifact a live
//! policy-approved one pins, even when that artifact lives in another repository; an
//! AcceleratedImage no policy owns, or one whose owner reference names a UID no policy has,
//! is ignored and the layer falls back. A lying artifact among an image's registry
//! referrers (newer than anything, its index relabelled from another image) is never used:
//! not for an image the cluster did not approve (normal pull), not for one it did (the
//! pinned artifact serves the real bytes), not when another image shares the layer. A pinned
//! artifact whose table of contents lies is caught by background verification.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Node, connect, http_get, metric, mount_at};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, Resource};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy};
use talaria_artifact::build::{BuildOptions, BuildSummary, build};
use talaria_artifact::discover;
use talaria_artifact::format::{self, ArtifactSpec, IndexedLayer, Knobs, Profile};
use talaria_artifact::index::{INDEX_MEDIA_TYPE, LayerIndex};
use talaria_artifact::oci;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_artifact::signature::{self, SigningKey};
use talaria_node::proto::containerd::services::snapshots::v1 as pb;
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;
use tonic::Code;

const ARTIFACT_REPO: &str = "talaria/artifacts";

fn store(host: &str, repo: &str) -> Arc<dyn Store> {
    let client = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    Arc::new(RegistryStore::new(
        client,
        Repository {
            registry: host.to_string(),
            name: repo.to_string(),
        },
    ))
}

/// A one-layer image holding `name` with `content`, pushed as `host/repo:v1`, and its
/// default artifact built into [`ARTIFACT_REPO`] (not the image's repository).
async fn image_with_artifact(
    host: &str,
    repo: &str,
    name: &str,
    content: &[u8],
) -> (images::Image, BuildSummary) {
    let img = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file(name, content.to_vec(), 0o644)
                .build()
                .expect("layer"),
        )
        .cmd(&["/bin/sh"])
        .build()
        .expect("image");
    img.push(host, repo, "v1").expect("push image");
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    let summary = build(
        store(host, repo),
        "v1",
        Some(store(host, ARTIFACT_REPO)),
        &opts,
    )
    .await
    .unwrap_or_else(|e| panic!("build the artifact of {repo}: {e}"));
    (img, summary)
}

/// Pushes, as a referrer of `victim` in its own repository `repo`, an artifact that lies:
/// `donor`'s layer index relabelled as the victim's layer, stamped newer than anything. A
/// node trusting referrers would pick it (checked) and serve the donor's files for the
/// victim's layer.
async fn plant_lying_referrer(
    host: &str,
    repo: &str,
    victim: &images::Image,
    donor: &BuildSummary,
) {
    let target = store(host, repo);
    let artifacts = store(host, ARTIFACT_REPO);
    let d = &donor.layers[0];
    let index = d.index.clone().expect("donor index");
    for desc in std::iter::once(&index).chain(d.windows.as_ref()) {
        let blob = artifacts
            .get_blob(&desc.digest, 64 << 20)
            .await
            .expect("donor blob");
        target
            .put_blob(&desc.media_type, blob)
            .await
            .expect("plant blob");
    }
    target
        .put_blob(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec().into())
        .await
        .expect("empty config");
    let subject = target
        .get_manifest(&victim.manifest_digest)
        .await
        .expect("victim manifest")
        .descriptor();
    let knobs = Knobs::default();
    let raw = format::build_manifest(ArtifactSpec {
        subject,
        profile: Profile::Default,
        knobs: &knobs,
        layers: vec![IndexedLayer {
            layer_digest: victim.layers[0].digest.clone(),
            index,
            windows: d.windows.clone(),
        }],
        skipped: vec![],
        plan: None,
        startup_paths: vec![],
        plan_recorded: false,
        pack: None,
        created: Some("2099-01-01T00:00:00Z".into()),
    })
    .expect("lying manifest");
    let desc = target
        .put_manifest(&raw, None)
        .await
        .expect("plant manifest");
    target
        .add_referrer(&victim.manifest_digest, &desc)
        .await
        .expect("plant referrer");
    let chosen = discover::resolve(target.as_ref(), &victim.manifest_digest)
        .await
        .expect("referrers")
        .expect("a referrer artifact");
    assert_eq!(
        chosen.descriptor.digest, desc.digest,
        "precondition: referrer discovery would choose the lie"
    );
}

/// Creates a Ready AcceleratedImage for `img` naming `summary`'s artifact, owned by
/// `owner` when given; the status is written through the status subresource.
async fn accelerated_image(
    api: &Api<AcceleratedImage>,
    name: &str,
    host: &str,
    repo: &str,
    img: &images::Image,
    summary: &BuildSummary,
    owner: Option<&AccelerationPolicy>,
) {
    pin(
        api,
        name,
        host,
        repo,
        img,
        &summary.key,
        &summary.artifact,
        owner,
    )
    .await
}

/// [`accelerated_image`] for any artifact (`key`, its manifest `artifact` in
/// [`ARTIFACT_REPO`]).
#[allow(clippy::too_many_arguments)]
async fn pin(
    api: &Api<AcceleratedImage>,
    name: &str,
    host: &str,
    repo: &str,
    img: &images::Image,
    key: &str,
    artifact: &oci::Descriptor,
    owner: Option<&AccelerationPolicy>,
) {
    let mut obj: AcceleratedImage = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AcceleratedImage",
        "metadata": { "name": name },
        "spec": {
            "image": format!("{host}/{repo}"),
            "digest": img.manifest_digest,
            "platform": talaria_node::remote::cluster::node_platform(),
            "profile": "default",
            "accelerationKey": key,
            "artifactRepository": format!("{host}/{ARTIFACT_REPO}"),
        },
    }))
    .expect("AcceleratedImage");
    if let Some(p) = owner {
        obj.metadata.owner_references = Some(vec![p.controller_owner_ref(&()).expect("owner ref")]);
    }
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create AcceleratedImage {name}: {e}"));
    let status = json!({ "status": {
        "phase": "Ready",
        "defaultArtifact": {
            "repository": format!("{host}/{ARTIFACT_REPO}"),
            "digest": artifact.digest,
            "size": artifact.size,
        },
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
    // The node learns of the pin through its watch; a Prepare right after could come first
    // (on a loaded CI machine it did: `no_artifact`). In a cluster the pin is there long
    // before a pull.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
}

/// Prepares the image's only layer as containerd's CRI plugin does; true when the node
/// provided it lazily, false when it handed out an active snapshot to unpack into.
async fn prepare(c: &mut Client, image_ref: &str, img: &images::Image) -> bool {
    let layer = &img.layers[0];
    let chain = layer.diff_id.clone();
    let key = format!("default/1/extract-{}", &chain[7..19]);
    let labels = HashMap::from([
        ("containerd.io/snapshot.ref".to_string(), chain.clone()),
        (
            "containerd.io/snapshot/cri.image-ref".to_string(),
            image_ref.to_string(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_string(),
            img.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".to_string(),
            layer.digest.clone(),
        ),
    ]);
    let res = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "talaria".into(),
            key: key.clone(),
            parent: String::new(),
            labels,
        })
        .await;
    match res {
        Err(e) if e.code() == Code::AlreadyExists => true,
        Ok(_) => {
            c.remove(pb::RemoveSnapshotRequest {
                snapshotter: "talaria".into(),
                key,
            })
            .await
            .expect("remove the fallback's active snapshot");
            false
        }
        Err(e) => panic!("prepare {image_ref}: {e}"),
    }
}

/// The real registry and kube-apiserver, Talaria's CRDs, and a policy (`approved`) for
/// `<registry>/talaria/*`.
struct TestCluster {
    registry: Registry,
    host: String,
    kube: KubeApi,
    client: kube::Client,
    images_api: Api<AcceleratedImage>,
    policy: AccelerationPolicy,
}

async fn test_cluster() -> TestCluster {
    talaria_artifact::oci::registry::install_crypto_provider();
    let registry = Registry::start().expect("start registry");
    let host = registry.host();
    let kube = KubeApi::start().await.expect("start kube-apiserver");
    let client = kube.client().await.expect("kube client");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [AccelerationPolicy::crd(), AcceleratedImage::crd()] {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
    }
    let policies: Api<AccelerationPolicy> = Api::all(client.clone());
    let images_api: Api<AcceleratedImage> = Api::all(client.clone());
    // Established: the resource answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while images_api.list(&Default::default()).await.is_err()
        || policies.list(&Default::default()).await.is_err()
    {
        assert!(Instant::now() < deadline, "CRDs not served within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let policy: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": { "name": "approved" },
        "spec": { "images": [format!("{host}/talaria/*")], "profile": "default" },
    }))
    .expect("policy");
    let policy = policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    assert!(policy.meta().uid.is_some());
    TestCluster {
        registry,
        host,
        kube,
        client,
        images_api,
        policy,
    }
}

/// Starts a node with the binary's defaults watching `tc`'s cluster; returns it and its
/// metrics address.
fn start_node(dir: &std::path::Path, tc: &TestCluster) -> (Node, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let metrics_addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let node = Node::start_with_defaults(
        &dir.join("root"),
        &dir.join("sn.sock"),
        &dir.join("node.log"),
        &[
            "--kubeconfig".into(),
            tc.kube.kubeconfig().display().to_string(),
            "--metrics-addr".into(),
            metrics_addr.clone(),
        ],
    );
    (node, metrics_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_mount_from_artifacts_a_policy_approved() {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cluster-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let (host, images_api, policy) = (tc.host.clone(), tc.images_api.clone(), tc.policy.clone());

    let ok_content = b"approved by a policy\n".repeat(1000);
    let (ok_img, ok_art) =
        image_with_artifact(&host, "talaria/approved", "ok.txt", &ok_content).await;
    accelerated_image(
        &images_api,
        "approved",
        &host,
        "talaria/approved",
        &ok_img,
        &ok_art,
        Some(&policy),
    )
    .await;
    let (stray_img, stray_art) =
        image_with_artifact(&host, "talaria/stray", "stray.txt", b"no policy\n").await;
    accelerated_image(
        &images_api,
        "stray",
        &host,
        "talaria/stray",
        &stray_img,
        &stray_art,
        None,
    )
    .await;

    // Forged: an owner reference naming the policy, with a UID no policy has.
    let mut impostor = policy.clone();
    impostor.metadata.uid = Some("00000000-0000-4000-8000-000000000000".into());
    let (forged_img, forged_art) =
        image_with_artifact(&host, "talaria/forged", "forged.txt", b"forged owner\n").await;
    accelerated_image(
        &images_api,
        "forged",
        &host,
        "talaria/forged",
        &forged_img,
        &forged_art,
        Some(&impostor),
    )
    .await;

    // Lying referrers: the stray (unapproved) image and the approved one each get an
    // artifact among their own referrers that serves another image's files.
    plant_lying_referrer(&host, "talaria/stray", &stray_img, &forged_art).await;
    plant_lying_referrer(&host, "talaria/approved", &ok_img, &forged_art).await;

    let (mut node, metrics_addr) = start_node(dir.path(), &tc);
    let mut c = connect(dir.path().join("sn.sock")).await;

    // Approved: mounted lazily from the pinned artifact in the other repository, not from
    // the newer lie among its referrers; reads are right.
    let ok_ref = format!("{host}/talaria/approved:v1");
    assert!(
        prepare(&mut c, &ok_ref, &ok_img).await,
        "approved image not provided:\n{}",
        node.log_text()
    );
    let chain = ok_img.layers[0].diff_id.clone();
    let view = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "talaria".into(),
            key: "view-ok".into(),
            parent: chain,
            labels: HashMap::new(),
        })
        .await
        .expect("view")
        .into_inner();
    let m = &view.mounts[0];
    let mnt = dir.path().join("mnt");
    mount_at(&m.r#type, &m.source, &m.options, &mnt);
    let read = std::fs::read(mnt.join("ok.txt"));
    nix::mount::umount(&mnt).expect("umount view");
    assert_eq!(read.expect("read ok.txt"), ok_content);
    let text = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        metric(
            &text,
            "talaria_node_mounted_layers_total{source=\"cluster\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "talaria_node_remote_mounts "), 1.0, "{text}");

    // Not approved (no owning policy): ignored; the lying referrer is not used; unpacked.
    let stray_ref = format!("{host}/talaria/stray:v1");
    assert!(!prepare(&mut c, &stray_ref, &stray_img).await);
    // An owner reference whose UID no live policy has approves nothing either.
    let forged_ref = format!("{host}/talaria/forged:v1");
    assert!(!prepare(&mut c, &forged_ref, &forged_img).await);
    let text = http_get(&metrics_addr, "/metrics");
    assert_eq!(
        metric(
            &text,
            "talaria_node_fallbacks_total{reason=\"no_artifact\"}"
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "talaria_node_mounted_layers_total{source=\"cluster\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(
        node.log_text().contains("source=\"cluster\"")
            || node.log_text().contains("source=cluster"),
        "the log names the source:\n{}",
        node.log_text()
    );
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
    eprintln!("cluster test took {:?}", t0.elapsed());
}

/// A one-layer image whose layer holds `etc/passwd` (`passwd`) and `etc/shadow` (0600);
/// `cmd` makes images that share the layer differ. Pushed as `host/repo:v1`.
fn passwd_image(host: &str, repo: &str, passwd: &[u8], cmd: &str) -> images::Image {
    let img = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .file("etc/passwd", passwd.to_vec(), 0o644)
                .file(
                    "etc/shadow",
                    b"root:$6$secret:19000::::::\n".repeat(64),
                    0o600,
                )
                .build()
                .expect("layer"),
        )
        .cmd(&["/bin/sh", "-c", cmd])
        .build()
        .expect("image");
    img.push(host, repo, "v1").expect("push image");
    img
}

/// An artifact for `img` whose index is `honest`'s with `etc/shadow` made setuid and
/// world-readable: every span digest still holds, the table of contents lies. (Stretching
/// a file into the next tar entry, the other classic lie, the decoder refuses outright:
/// entry offsets may not go backwards.) Pushed into `repo` (its manifest and index);
/// returns the manifest's descriptor. `honest` lives in `honest_repo`.
async fn lying_artifact(
    host: &str,
    repo: &str,
    img: &images::Image,
    honest: &BuildSummary,
    honest_repo: &str,
) -> oci::Descriptor {
    let target = store(host, repo);
    let d = &honest.layers[0];
    let index = d.index.clone().expect("honest index");
    let raw = store(host, honest_repo)
        .get_blob(&index.digest, 64 << 20)
        .await
        .expect("honest index blob");
    let mut ix = LayerIndex::decode(&raw).expect("decode");
    let e = ix
        .entries
        .iter_mut()
        .find(|e| e.path == "etc/shadow")
        .expect("etc/shadow indexed");
    e.mode = 0o4755;
    let lie = target
        .put_blob(INDEX_MEDIA_TYPE, ix.encode().into())
        .await
        .expect("push the lying index");
    if let Some(w) = &d.windows {
        let blob = store(host, honest_repo)
            .get_blob(&w.digest, 64 << 20)
            .await
            .expect("windows");
        target.put_blob(&w.media_type, blob).await.expect("windows");
    }
    target
        .put_blob(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec().into())
        .await
        .expect("empty config");
    let subject = target
        .get_manifest(&img.manifest_digest)
        .await
        .map(|m| m.descriptor())
        .unwrap_or_else(|_| honest.image.clone());
    let knobs = Knobs::default();
    let raw = format::build_manifest(ArtifactSpec {
        subject,
        profile: Profile::Default,
        knobs: &knobs,
        layers: vec![IndexedLayer {
            layer_digest: img.layers[0].digest.clone(),
            index: lie,
            windows: d.windows.clone(),
        }],
        skipped: vec![],
        plan: None,
        startup_paths: vec![],
        plan_recorded: false,
        pack: None,
        created: Some("2099-01-01T00:00:00Z".into()),
    })
    .expect("lying manifest");
    target.put_manifest(&raw, None).await.expect("push")
}

/// Reads `name` through a view of `chain` (mounted at `mnt`, unmounted after).
async fn read_via_view(
    c: &mut Client,
    chain: &str,
    view: &str,
    mnt: &std::path::Path,
    name: &str,
) -> std::io::Result<Vec<u8>> {
    with_view(c, chain, view, mnt, |root| std::fs::read(root.join(name))).await
}

/// Runs `f` on a view of `chain` mounted at `mnt` (unmounted and removed after).
async fn with_view<T>(
    c: &mut Client,
    chain: &str,
    view: &str,
    mnt: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> T,
) -> T {
    let v = c
        .view(pb::ViewSnapshotRequest {
            snapshotter: "talaria".into(),
            key: view.into(),
            parent: chain.into(),
            labels: HashMap::new(),
        })
        .await
        .expect("view")
        .into_inner();
    let m = &v.mounts[0];
    mount_at(&m.r#type, &m.source, &m.options, mnt);
    let out = f(mnt);
    nix::mount::umount(mnt).expect("umount view");
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "talaria".into(),
        key: view.into(),
    })
    .await
    .expect("remove view");
    out
}

/// Prepares the image's only layer as containerd does and, when the node hands out an
/// active snapshot instead of providing it, unpacks the real layer into it and commits it
/// under the chain id (containerd's normal pull). True when provided lazily.
async fn pull(c: &mut Client, image_ref: &str, img: &images::Image, mnt: &std::path::Path) -> bool {
    let layer = &img.layers[0];
    let chain = layer.diff_id.clone();
    let key = format!("default/2/extract-{}", &img.manifest_digest[7..19]);
    let labels = HashMap::from([
        ("containerd.io/snapshot.ref".to_string(), chain.clone()),
        (
            "containerd.io/snapshot/cri.image-ref".to_string(),
            image_ref.to_string(),
        ),
        (
            "containerd.io/snapshot/cri.manifest-digest".to_string(),
            img.manifest_digest.clone(),
        ),
        (
            "containerd.io/snapshot/cri.layer-digest".to_string(),
            layer.digest.clone(),
        ),
    ]);
    let res = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "talaria".into(),
            key: key.clone(),
            parent: String::new(),
            labels: labels.clone(),
        })
        .await;
    let mounts = match res {
        Err(e) if e.code() == Code::AlreadyExists => return true,
        Err(e) => panic!("prepare {image_ref}: {e}"),
        Ok(r) => r.into_inner().mounts,
    };
    let m = &mounts[0];
    mount_at(&m.r#type, &m.source, &m.options, mnt);
    let unpacked = tar::Archive::new(flate2::read::GzDecoder::new(&layer.blob[..])).unpack(mnt);
    nix::mount::umount(mnt).expect("umount the active snapshot");
    unpacked.expect("unpack the layer");
    // containerd commits with the labels it prepared with (the target among them).
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "talaria".into(),
        name: chain,
        key,
        labels,
    })
    .await
    .expect("commit the unpacked layer");
    false
}

/// Polls the node's metrics until the line starting with `prefix` reaches `want`.
async fn wait_metric(addr: &str, prefix: &str, want: f64, node: &Node) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = http_get(addr, "/metrics");
        if metric(&text, prefix) >= want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} did not reach {want} within 60 s:\n{text}\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Defence in depth (docs/trust.md): an artifact the cluster pins (here written by hand, as
/// a compromised status writer would) whose table of contents makes `/etc/shadow` setuid
/// and world-readable. Span digests all hold; once the background fetch has the whole layer,
/// the node parses its tar headers again, finds the lie, poisons the layer (reads fail,
/// counted), records a Warning Event on the AcceleratedImage and quarantines the index: the
/// layer is unpacked normally from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_index_that_lies_is_poisoned_by_background_verification() {
    let dir = tempfile::Builder::new()
        .prefix("tlr-verify-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let host = tc.host.clone();
    let repo = "talaria/verified";
    let img = passwd_image(&host, repo, b"root:x:0:0:root:/root:/bin/sh\n", "true");
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    let honest = build(
        store(&host, repo),
        "v1",
        Some(store(&host, ARTIFACT_REPO)),
        &opts,
    )
    .await
    .expect("honest artifact");
    let lie = lying_artifact(&host, ARTIFACT_REPO, &img, &honest, ARTIFACT_REPO).await;
    pin(
        &tc.images_api,
        "lying",
        &host,
        repo,
        &img,
        &honest.key,
        &lie,
        Some(&tc.policy),
    )
    .await;

    let (mut node, metrics) = start_node(dir.path(), &tc);
    let mut c = connect(dir.path().join("sn.sock")).await;
    let mnt = dir.path().join("mnt");
    let image_ref = format!("{host}/{repo}:v1");
    assert!(
        pull(&mut c, &image_ref, &img, &mnt).await,
        "the pinned artifact was not mounted:\n{}",
        node.log_text()
    );
    let text = wait_metric(
        &metrics,
        "talaria_node_verification_failures_total{reason=\"table_of_contents\"}",
        1.0,
        &node,
    )
    .await;
    assert_eq!(
        metric(&text, "talaria_node_verified_layers_total"),
        0.0,
        "{text}"
    );
    // Poisoned: a read fails (EIO) rather than return what the lie says.
    let chain = img.layers[0].diff_id.clone();
    let read = read_via_view(&mut c, &chain, "view-lie", &mnt, "etc/passwd").await;
    assert!(
        read.is_err(),
        "a poisoned layer served {:?}",
        read.map(|d| d.len())
    );
    let text = http_get(&metrics, "/metrics");
    assert!(
        metric(&text, "talaria_node_read_errors_total") >= 1.0,
        "{text}"
    );

    // The Event, on the AcceleratedImage.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(tc.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = events
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("LayerVerificationFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("lying")
            });
        if let Some(e) = found {
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            let note = e.note.unwrap_or_default();
            assert!(note.contains(&img.layers[0].digest), "{note}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Event within 30 s:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Quarantined: once the layer is removed, the same artifact is not mounted again.
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "talaria".into(),
        key: chain.clone(),
    })
    .await
    .expect("remove the poisoned layer");
    assert!(
        !pull(&mut c, &image_ref, &img, &mnt).await,
        "mounted from a quarantined index"
    );
    let text = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(
            &text,
            "talaria_node_fallbacks_total{reason=\"quarantined\"}"
        ),
        1.0,
        "{text}"
    );
    // The normal unpack serves the real file.
    let real = read_via_view(&mut c, &chain, "view-real", &mnt, "etc/passwd").await;
    assert_eq!(real.expect("read"), b"root:x:0:0:root:/root:/bin/sh\n");
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
}

/// Two images share a layer; the attacker's has a lying artifact among its referrers (its
/// `/etc/shadow` setuid and world-readable), the victim's is pinned by the cluster.
/// Whichever image starts first, the victim reads the real bytes: the lie is never mounted
/// (a layer a node provides lazily comes only from a pinned artifact, and the chain the
/// other image made is either that or containerd's own unpack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_layer_serves_the_victim_real_bytes_whichever_image_starts_first() {
    let dir = tempfile::Builder::new()
        .prefix("tlr-shared-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let host = tc.host.clone();
    let (mut node, metrics) = start_node(dir.path(), &tc);
    let mut c = connect(dir.path().join("sn.sock")).await;
    let mnt = dir.path().join("mnt");
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    for (round, attacker_first) in [(1, true), (2, false)] {
        // Each round its own layer (its own chain on the node).
        let passwd = format!("root:x:0:0:round {round}:/root:/bin/sh\n").into_bytes();
        let (victim_repo, attacker_repo) = (
            format!("talaria/victim{round}"),
            format!("talaria/attacker{round}"),
        );
        let victim = passwd_image(&host, &victim_repo, &passwd, "victim");
        let attacker = passwd_image(&host, &attacker_repo, &passwd, "attacker");
        assert_eq!(victim.layers[0].digest, attacker.layers[0].digest);
        assert_ne!(victim.manifest_digest, attacker.manifest_digest);
        let honest = build(
            store(&host, &victim_repo),
            "v1",
            Some(store(&host, ARTIFACT_REPO)),
            &opts,
        )
        .await
        .expect("victim's artifact");
        accelerated_image(
            &tc.images_api,
            &format!("victim{round}"),
            &host,
            &victim_repo,
            &victim,
            &honest,
            Some(&tc.policy),
        )
        .await;
        // The attacker's lie, among the attacker image's own referrers.
        let lie = lying_artifact(&host, &attacker_repo, &attacker, &honest, ARTIFACT_REPO).await;
        store(&host, &attacker_repo)
            .add_referrer(&attacker.manifest_digest, &lie)
            .await
            .expect("plant referrer");

        let victim_ref = format!("{host}/{victim_repo}:v1");
        let attacker_ref = format!("{host}/{attacker_repo}:v1");
        if attacker_first {
            assert!(
                !pull(&mut c, &attacker_ref, &attacker, &mnt).await,
                "the lie was mounted"
            );
            // The chain exists now (containerd's unpack): the victim reuses it.
            assert!(pull(&mut c, &victim_ref, &victim, &mnt).await);
        } else {
            assert!(
                pull(&mut c, &victim_ref, &victim, &mnt).await,
                "{}",
                node.log_text()
            );
            assert!(pull(&mut c, &attacker_ref, &attacker, &mnt).await);
        }
        let chain = victim.layers[0].diff_id.clone();
        let (read, meta) = with_view(&mut c, &chain, &format!("view-{round}"), &mnt, |root| {
            (
                std::fs::read(root.join("etc/passwd")),
                std::fs::metadata(root.join("etc/shadow")),
            )
        })
        .await;
        assert_eq!(
            read.expect("read /etc/passwd"),
            passwd,
            "round {round}: other bytes"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.expect("stat").permissions());
        assert_eq!(
            mode & 0o7777,
            0o600,
            "round {round}: /etc/shadow is not the image's"
        );
    }
    let text = http_get(&metrics, "/metrics");
    // Round 2 mounted the victim's pinned artifact; nothing came from referrers.
    assert_eq!(
        metric(
            &text,
            "talaria_node_mounted_layers_total{source=\"cluster\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "talaria_node_mounted_layers_total{source=\"referrers\"}"
        ),
        0.0,
        "{text}"
    );
    // The honest layer passes background verification.
    wait_metric(&metrics, "talaria_node_verified_layers_total", 1.0, &node).await;
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
}

fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*pos];
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `honest` (an encoded index, docs/index-format.md) with its entry count, table-of-contents
/// length and compressed table of contents replaced.
fn splice_toc(honest: &[u8], entries: u64, toc_len: u64, toc_z: &[u8]) -> Vec<u8> {
    // Magic, version, compression; three sizes; two digests.
    let mut p = 6;
    for _ in 0..3 {
        read_varint(honest, &mut p);
    }
    p += 64;
    let head = p;
    read_varint(honest, &mut p);
    read_varint(honest, &mut p);
    let n = read_varint(honest, &mut p) as usize;
    p += n;
    let mut out = honest[..head].to_vec();
    put_varint(&mut out, entries);
    put_varint(&mut out, toc_len);
    put_varint(&mut out, toc_z.len() as u64);
    out.extend_from_slice(toc_z);
    out.extend_from_slice(&honest[p..]);
    out
}

/// Hostile artifacts, pinned by hand as a compromised status writer would (a node serves
/// nothing else): a table of contents that inflates to 120 MiB of nothing, an entry-count
/// bomb, a 1 GiB span, and an artifact repository whose error bodies never end. Each fails
/// only its image (unpacked normally, counted), a good image still mounts lazily after
/// them, and the node's peak RSS stays under the documented cap (docs/trust.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_artifacts_fail_only_their_image_within_the_memory_caps() {
    // The chart's memory limit of the agent (docs/trust.md: budget + one worst decode).
    const CAP: u64 = 1 << 30;
    let dir = tempfile::Builder::new()
        .prefix("tlr-bombs-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let host = tc.host.clone();
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    let (mut node, metrics) = start_node(dir.path(), &tc);
    let mut c = connect(dir.path().join("sn.sock")).await;
    let mnt = dir.path().join("mnt");
    let baseline = node.peak_rss();

    // 120 MiB of zeros compress ~1000:1: within the decoder's ratio and size caps.
    let zeros = {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let mib = vec![0u8; 1 << 20];
        for _ in 0..120 {
            z.write_all(&mib).expect("zlib");
        }
        z.finish().expect("zlib")
    };
    // Each makes a hostile index blob from an honest one.
    type MakeBomb<'a> = Box<dyn Fn(&[u8]) -> Vec<u8> + 'a>;
    let bombs: [(&str, MakeBomb); 3] = [
        (
            "toc",
            Box::new(|honest| splice_toc(honest, 1, 120 << 20, &zeros)),
        ),
        (
            "entries",
            Box::new(|honest| {
                let mut ix = LayerIndex::decode(honest).expect("decode");
                let e = ix.entries[0].clone();
                ix.entries = vec![e; 1_100_000];
                ix.encode()
            }),
        ),
        (
            "span",
            Box::new(|honest| {
                let mut ix = LayerIndex::decode(honest).expect("decode");
                ix.spans[0].uncompressed_size = 1 << 30;
                ix.encode()
            }),
        ),
    ];
    let arts = store(&host, ARTIFACT_REPO);
    for (i, (what, make)) in bombs.iter().enumerate() {
        let repo = format!("talaria/bomb-{what}");
        let img = passwd_image(&host, &repo, format!("bomb {what}\n").as_bytes(), what);
        let honest = build(store(&host, &repo), "v1", Some(arts.clone()), &opts)
            .await
            .expect("honest artifact");
        let d = &honest.layers[0];
        let index = d.index.clone().expect("index");
        let raw = arts
            .get_blob(&index.digest, 64 << 20)
            .await
            .expect("index blob");
        let bomb = make(&raw);
        let bomb_desc = arts
            .put_blob(INDEX_MEDIA_TYPE, bomb.into())
            .await
            .expect("push bomb");
        let knobs = Knobs::default();
        let manifest = format::build_manifest(ArtifactSpec {
            subject: honest.image.clone(),
            profile: Profile::Default,
            knobs: &knobs,
            layers: vec![IndexedLayer {
                layer_digest: img.layers[0].digest.clone(),
                index: bomb_desc,
                windows: d.windows.clone(),
            }],
            skipped: vec![],
            plan: None,
            startup_paths: vec![],
            plan_recorded: false,
            pack: None,
            created: None,
        })
        .expect("manifest");
        let art = arts.put_manifest(&manifest, None).await.expect("push");
        pin(
            &tc.images_api,
            &format!("bomb-{what}"),
            &host,
            &repo,
            &img,
            &honest.key,
            &art,
            Some(&tc.policy),
        )
        .await;
        let t0 = Instant::now();
        assert!(
            !pull(&mut c, &format!("{host}/{repo}:v1"), &img, &mnt).await,
            "{what} bomb mounted"
        );
        let peak = node.peak_rss();
        eprintln!(
            "{what} bomb: unpacked normally after {:?}; node peak RSS {} MiB (baseline {} MiB)",
            t0.elapsed(),
            peak >> 20,
            baseline >> 20
        );
        assert!(peak < CAP, "{what} bomb: peak RSS {} MiB", peak >> 20);
        let text = http_get(&metrics, "/metrics");
        assert_eq!(
            metric(
                &text,
                "talaria_node_fallbacks_total{reason=\"index_error\"}"
            ),
            (i + 1) as f64,
            "{text}"
        );
    }

    // An artifact repository whose error bodies never end: the node reads 64 KiB of each.
    let hostile = talaria_testenv::hostile::endless_error_registry().expect("hostile registry");
    let repo = "talaria/bomb-error";
    let img = passwd_image(&host, repo, b"bomb error\n", "error");
    let honest = build(store(&host, repo), "v1", Some(arts.clone()), &opts)
        .await
        .expect("honest artifact");
    let mut obj: AcceleratedImage = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AcceleratedImage",
        "metadata": { "name": "bomb-error" },
        "spec": {
            "image": format!("{host}/{repo}"),
            "digest": img.manifest_digest,
            "platform": talaria_node::remote::cluster::node_platform(),
            "profile": "default",
            "accelerationKey": honest.key,
            "artifactRepository": format!("{hostile}/{ARTIFACT_REPO}"),
        },
    }))
    .expect("AcceleratedImage");
    obj.metadata.owner_references = Some(vec![tc.policy.controller_owner_ref(&()).expect("owner")]);
    tc.images_api
        .create(&PostParams::default(), &obj)
        .await
        .expect("create");
    let status = json!({ "status": {
        "phase": "Ready",
        "defaultArtifact": {
            "repository": format!("{hostile}/{ARTIFACT_REPO}"),
            "digest": honest.artifact.digest,
            "size": honest.artifact.size,
        },
    }});
    tc.images_api
        .patch_status(
            "bomb-error",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .expect("status");
    let t0 = Instant::now();
    assert!(!pull(&mut c, &format!("{host}/{repo}:v1"), &img, &mnt).await);
    let peak = node.peak_rss();
    eprintln!(
        "endless error body: unpacked normally after {:?}; node peak RSS {} MiB",
        t0.elapsed(),
        peak >> 20
    );
    assert!(peak < CAP, "error body: peak RSS {} MiB", peak >> 20);

    // The node is unharmed: a good image mounts lazily and reads right.
    let repo = "talaria/after-bombs";
    let img = passwd_image(&host, repo, b"still fine\n", "fine");
    let good = build(store(&host, repo), "v1", Some(arts.clone()), &opts)
        .await
        .expect("artifact");
    accelerated_image(
        &tc.images_api,
        "after-bombs",
        &host,
        repo,
        &img,
        &good,
        Some(&tc.policy),
    )
    .await;
    assert!(
        pull(&mut c, &format!("{host}/{repo}:v1"), &img, &mnt).await,
        "{}",
        node.log_text()
    );
    let chain = img.layers[0].diff_id.clone();
    let read = read_via_view(&mut c, &chain, "view-good", &mnt, "etc/passwd").await;
    assert_eq!(read.expect("read"), b"still fine\n");
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
}

/// The second way to vouch (docs/trust.md): an artifact among the image's referrers signed,
/// cosign-compatibly, by a key the node trusts is used when the cluster pins none; the same
/// image's newer, unsigned lie is not, and an artifact signed by another key is not either.
/// `cosign verify --key` accepts Talaria's signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_signed_by_a_trusted_key_is_used_and_others_are_not() {
    let dir = tempfile::Builder::new()
        .prefix("tlr-signed-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let host = tc.host.clone();
    let (trusted_private, trusted_public) = SigningKey::generate().expect("key");
    let (stranger_private, _) = SigningKey::generate().expect("key");
    let trusted = SigningKey::from_pem(&trusted_private).expect("key");
    let stranger = SigningKey::from_pem(&stranger_private).expect("key");
    let pubkey = dir.path().join("trusted.pub");
    std::fs::write(&pubkey, &trusted_public).expect("write key");
    let opts = BuildOptions {
        profile: Profile::Default,
        ..BuildOptions::default()
    };

    // Signed by the trusted key, with an unsigned lie newer than it among the referrers.
    let repo = "talaria/signed";
    let passwd = b"root:x:0:0:signed:/root:/bin/sh\n";
    let img = passwd_image(&host, repo, passwd, "signed");
    let art = build(store(&host, repo), "v1", None, &opts)
        .await
        .expect("artifact");
    signature::sign(
        store(&host, repo).as_ref(),
        &format!("{host}/{repo}"),
        &art.artifact,
        &trusted,
    )
    .await
    .expect("sign");
    let lie = lying_artifact(&host, repo, &img, &art, repo).await;
    store(&host, repo)
        .add_referrer(&img.manifest_digest, &lie)
        .await
        .expect("plant referrer");
    // Signed by a key the node does not trust.
    let other_repo = "talaria/stranger";
    let other = passwd_image(&host, other_repo, b"stranger\n", "stranger");
    let other_art = build(store(&host, other_repo), "v1", None, &opts)
        .await
        .expect("artifact");
    signature::sign(
        store(&host, other_repo).as_ref(),
        &format!("{host}/{other_repo}"),
        &other_art.artifact,
        &stranger,
    )
    .await
    .expect("sign");

    // cosign itself accepts the signature (key pair, no transparency log).
    let out = std::process::Command::new("cosign")
        .args([
            "verify",
            "--key",
            pubkey.to_str().expect("path"),
            "--insecure-ignore-tlog=true",
            "--allow-http-registry=true",
            "--allow-insecure-registry=true",
            &format!("{host}/{repo}@{}", art.artifact.digest),
        ])
        .output()
        .expect("run cosign (hack/tools.sh cosign)");
    assert!(
        out.status.success(),
        "cosign verify: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("cosign")
        .args([
            "verify",
            "--key",
            pubkey.to_str().expect("path"),
            "--insecure-ignore-tlog=true",
            "--allow-http-registry=true",
            "--allow-insecure-registry=true",
            &format!("{host}/{other_repo}@{}", other_art.artifact.digest),
        ])
        .output()
        .expect("run cosign");
    assert!(
        !out.status.success(),
        "cosign accepted another key's signature"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let metrics = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let mut node = Node::start_with_defaults(
        &dir.path().join("root"),
        &dir.path().join("sn.sock"),
        &dir.path().join("node.log"),
        &[
            "--kubeconfig".into(),
            tc.kube.kubeconfig().display().to_string(),
            "--metrics-addr".into(),
            metrics.clone(),
            "--trusted-key".into(),
            pubkey.display().to_string(),
        ],
    );
    let mut c = connect(dir.path().join("sn.sock")).await;
    let mnt = dir.path().join("mnt");
    assert!(
        pull(&mut c, &format!("{host}/{repo}:v1"), &img, &mnt).await,
        "the signed artifact was not used:\n{}",
        node.log_text()
    );
    let chain = img.layers[0].diff_id.clone();
    let (read, meta) = with_view(&mut c, &chain, "view-signed", &mnt, |root| {
        (
            std::fs::read(root.join("etc/passwd")),
            std::fs::metadata(root.join("etc/shadow")),
        )
    })
    .await;
    assert_eq!(read.expect("read"), passwd);
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.expect("stat").permissions());
    assert_eq!(mode & 0o7777, 0o600, "the unsigned lie was used");
    assert!(
        !pull(&mut c, &format!("{host}/{other_repo}:v1"), &other, &mnt).await,
        "an artifact signed by an untrusted key was used"
    );
    let text = http_get(&metrics, "/metrics");
    assert_eq!(
        metric(
            &text,
            "talaria_node_mounted_layers_total{source=\"signed\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "talaria_node_fallbacks_total{reason=\"no_artifact\"}"
        ),
        1.0,
        "{text}"
    );
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
}

/// The case of a layer that proves inconsistent later: an honest artifact is pinned,
/// then the layer blob changes in the registry's storage (same digest, other bytes, as a
/// compromised registry would serve). The spans the background fetch brings fail the pinned
/// index's check: the layer is poisoned (reason `span`), counted, and the Event recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_the_registry_changes_is_poisoned() {
    let dir = tempfile::Builder::new()
        .prefix("tlr-changed-")
        .tempdir()
        .expect("tempdir");
    let tc = test_cluster().await;
    let host = tc.host.clone();
    let repo = "talaria/changed";
    let img = passwd_image(
        &host,
        repo,
        b"root:x:0:0:changed:/root:/bin/sh\n",
        "changed",
    );
    let honest = build(
        store(&host, repo),
        "v1",
        Some(store(&host, ARTIFACT_REPO)),
        &BuildOptions {
            profile: Profile::Default,
            ..BuildOptions::default()
        },
    )
    .await
    .expect("artifact");
    accelerated_image(
        &tc.images_api,
        "changed",
        &host,
        repo,
        &img,
        &honest,
        Some(&tc.policy),
    )
    .await;
    // Same size, other bytes, from the middle of the compressed blob on.
    let hex = &img.layers[0].digest["sha256:".len()..];
    let data = tc.registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut blob = std::fs::read(&data).expect("the layer blob in storage");
    let (mid, end) = (blob.len() / 2, blob.len() - 8);
    for b in &mut blob[mid..end] {
        *b = b.wrapping_add(1);
    }
    std::fs::write(&data, &blob).expect("change the blob");

    let (mut node, metrics) = start_node(dir.path(), &tc);
    let mut c = connect(dir.path().join("sn.sock")).await;
    let mnt = dir.path().join("mnt");
    assert!(
        pull(&mut c, &format!("{host}/{repo}:v1"), &img, &mnt).await,
        "{}",
        node.log_text()
    );
    wait_metric(
        &metrics,
        "talaria_node_verification_failures_total{reason=\"span\"}",
        1.0,
        &node,
    )
    .await;
    let chain = img.layers[0].diff_id.clone();
    let read = read_via_view(&mut c, &chain, "view-changed", &mnt, "etc/shadow").await;
    assert!(
        read.is_err(),
        "a poisoned layer served {:?}",
        read.map(|d| d.len())
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(tc.client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some("LayerVerificationFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("changed")
        })
    {
        assert!(
            Instant::now() < deadline,
            "no Event within 30 s:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(c);
    let status = node.signal("TERM");
    assert!(status.success(), "node exit: {status}\n{}", node.log_text());
}
