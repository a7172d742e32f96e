//! The node's trust rule, with the real kube-apiserver and registry (docs/trust.md): the
//! node watches AcceleratedImages and mounts a layer lazily from the artifact a live
//! policy-approved one pins, even when that artifact lives in another repository; an
//! AcceleratedImage no policy owns, or one whose owner reference names a UID no policy has,
//! is ignored and the layer falls back. A lying artifact among an image's registry
//! referrers (newer than anything, its index relabelled from another image) is never used:
//! not for an image the cluster did not approve (normal pull), not for one it did (the
//! pinned artifact serves the real bytes).

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
use talaria_artifact::oci;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig, Repository};
use talaria_artifact::oci::store::{RegistryStore, Store};
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
    let mut obj: AcceleratedImage = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AcceleratedImage",
        "metadata": { "name": name },
        "spec": {
            "image": format!("{host}/{repo}"),
            "digest": img.manifest_digest,
            "platform": talaria_node::remote::cluster::node_platform(),
            "profile": "default",
            "accelerationKey": summary.key,
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
            "digest": summary.artifact.digest,
            "size": summary.artifact.size,
        },
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_mount_from_artifacts_a_policy_approved() {
    talaria_artifact::oci::registry::install_crypto_provider();
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tlr-cluster-")
        .tempdir()
        .expect("tempdir");
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

    let socket = dir.path().join("sn.sock");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let metrics_addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let mut node = Node::start_with_defaults(
        &dir.path().join("root"),
        &socket,
        &dir.path().join("node.log"),
        &[
            "--kubeconfig".into(),
            kube.kubeconfig().display().to_string(),
            "--metrics-addr".into(),
            metrics_addr.clone(),
        ],
    );
    let mut c = connect(socket.clone()).await;

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
