//! The controller against a real kube-apiserver + etcd + kube-controller-manager (garbage
//! collection) and a real registry: policies and pods in, AcceleratedImages and artifacts out.
//! One control plane serves the whole scenario (starting one takes seconds on 2 cores).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{image_of, wait_for};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase, Profile};
use talaria_artifact::discover;
use talaria_artifact::discover::list_artifacts;
use talaria_artifact::oci::registry::{ImageRef, RegistryClient, RegistryConfig};
use talaria_artifact::oci::store::RegistryStore;
use talaria_controller::metrics::Metrics;
use talaria_testenv::apiserver::{KubeApi, KubeOptions};
use talaria_testenv::images::{self, ImageBuilder, Layer, LayerBuilder, sha256_digest};
use talaria_testenv::registry::Registry;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(120);

fn platform() -> String {
    format!("linux/{}", images::oci_arch())
}

/// Pushes a small image of its own content; returns the manifest digest.
fn push_image(reg: &Registry, repo: &str, tag: &str, seed: &str) -> String {
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/seed", seed.as_bytes().to_vec(), 0o644)
        .file("bin/app", vec![7u8; 200_000], 0o755)
        .build()
        .expect("layer");
    let img = ImageBuilder::new()
        .layer(layer)
        .cmd(&["/bin/app"])
        .build()
        .expect("image");
    img.push(&reg.host(), repo, tag).expect("push image")
}

/// Pushes an image whose layer claims to be gzip but is not.
fn push_corrupt_image(reg: &Registry, repo: &str, tag: &str) -> String {
    let blob = b"this is not a gzip stream, not a tar either".to_vec();
    let bad = Layer {
        digest: sha256_digest(&blob),
        diff_id: sha256_digest(&blob),
        blob,
    };
    let img = ImageBuilder::new().layer(bad).build().expect("image");
    img.push(&reg.host(), repo, tag)
        .expect("push corrupt image")
}

async fn create_policy(client: &Client, name: &str, spec: serde_json::Value) {
    let api: Api<AccelerationPolicy> = Api::all(client.clone());
    let p: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("policy json");
    api.create(&PostParams::default(), &p)
        .await
        .unwrap_or_else(|e| panic!("create policy {name}: {e}"));
}

async fn create_pod(client: &Client, ns: &str, name: &str, init: &[&str], main: &[&str]) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let c = |prefix: &str, imgs: &[&str]| {
        imgs.iter()
            .enumerate()
            .map(|(i, im)| json!({"name": format!("{prefix}{i}"), "image": im}))
            .collect::<Vec<_>>()
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"initContainers": c("i", init), "containers": c("c", main)},
    }))
    .expect("pod json");
    api.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
}

fn owners(img: &AcceleratedImage) -> Vec<String> {
    let mut v: Vec<String> = img
        .owner_references()
        .iter()
        .map(|o| o.name.clone())
        .collect();
    v.sort();
    v
}

/// The AcceleratedImage of a digest (there must be at most one).
async fn wait_phase(api: &Api<AcceleratedImage>, digest: &str, phase: Phase) -> AcceleratedImage {
    common::wait_phase(api, digest, phase, WAIT).await
}

async fn stop_controller(tx: watch::Sender<bool>, h: tokio::task::JoinHandle<()>) {
    let _ = tx.send(true);
    tokio::time::timeout(Duration::from_secs(60), h)
        .await
        .expect("controller stops within a minute")
        .expect("controller task");
}

fn metric(m: &Metrics, line_prefix: &str) -> u64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_pods_images_artifacts_and_garbage_collection() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let kube = KubeApi::start_with(KubeOptions::with_controller_manager())
        .await
        .expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;
    let host = reg.host();

    let app = push_image(&reg, "team/app", "v1", "app");
    let other = push_image(&reg, "team/other", "v1", "other");
    let base = push_image(&reg, "shared/base", "v1", "base");
    let corrupt = push_corrupt_image(&reg, "team/corrupt", "v1");

    // Namespaces: only pods in team=a namespaces count for policy "team".
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for (ns, team) in [("apps", "a"), ("elsewhere", "b")] {
        let n: Namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"team": team}}
        }))
        .expect("ns");
        ns_api
            .create(&PostParams::default(), &n)
            .await
            .expect("create ns");
    }
    create_pod(
        &client,
        "apps",
        "web",
        &[&format!("{host}/team/other:v1")],
        &[&format!("{host}/team/app:v1"), "busybox:latest"],
    )
    .await;
    // Out of scope: its namespace does not match, so team/corrupt is only built when listed.
    create_pod(
        &client,
        "elsewhere",
        "batch",
        &[],
        &[&format!("{host}/team/corrupt:v1")],
    )
    .await;

    let metrics = Arc::new(Metrics::new());
    let (stop, handle) = common::start_controller(client.clone(), metrics.clone());
    let plat = platform();
    create_policy(
        &client,
        "team",
        json!({
            "selector": {
                "images": [format!("{host}/team/**")],
                "namespaceSelector": {"matchLabels": {"team": "a"}},
            },
            "platforms": [plat],
        }),
    )
    .await;
    create_policy(
        &client,
        "shared",
        json!({
            "selector": {"images": [format!("{host}/team/app:v*")]},
            "images": [
                format!("{host}/shared/base:v1"),
                format!("{host}/missing/image:nope"),
                format!("{host}/team/corrupt:v1"),
            ],
            "platforms": [plat],
        }),
    )
    .await;

    let images: Api<AcceleratedImage> = Api::all(client.clone());
    let a = wait_phase(&images, &app, Phase::Ready).await;
    let o = wait_phase(&images, &other, Phase::Ready).await;
    let b = wait_phase(&images, &base, Phase::Ready).await;
    // Failed after every allowed attempt (2 here), with backoff between them.
    let c = wait_for("corrupt image Failed after 2 attempts", WAIT, || async {
        let i = image_of(&images, &corrupt).await?;
        let s = i.status.as_ref()?;
        (s.phase == Phase::Failed && s.attempts == 2).then_some(i)
    })
    .await;

    // One image selected by two policies: one object, two owners, one build.
    assert_eq!(owners(&a), ["shared", "team"]);
    assert_eq!(owners(&o), ["team"]);
    assert_eq!(owners(&b), ["shared"]);
    assert_eq!(a.spec.image, format!("{host}/team/app"));
    assert_eq!(a.spec.platform, plat);
    assert_eq!(a.spec.profile, Profile::StartupLocalV1);
    assert!(
        a.owner_references()
            .iter()
            .all(|o| o.controller != Some(true))
    );
    assert_eq!(
        metric(
            &metrics,
            "talaria_controller_builds_total{result=\"built\"}"
        ),
        3
    );

    // Status is complete, and the artifacts are in the registry, resolvable by digest.
    let st = a.status.clone().expect("status");
    let art = st.artifact.clone().expect("artifact");
    let def = st.default_artifact.clone().expect("default artifact");
    assert_eq!(art.repository, format!("{host}/team/app"));
    assert_ne!(art.digest, def.digest);
    assert_eq!(st.layers_indexed, 1);
    assert_eq!(st.attempts, 1);
    assert!(st.build_duration_seconds.is_some());
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let rc = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let store = RegistryStore::new(
        rc,
        ImageRef::parse(&format!("{host}/team/app:v1"))
            .expect("ref")
            .repository,
    );
    let found = list_artifacts(&store, &app).await.expect("list artifacts");
    assert_eq!(
        found.len(),
        2,
        "one accelerated + one default artifact: {found:?}"
    );
    let best = discover::resolve(&store, &app)
        .await
        .expect("resolve")
        .expect("an artifact");
    assert_eq!(best.descriptor.digest, art.digest);
    assert_eq!(best.key, a.spec.acceleration_key);

    // The corrupt image failed with a clear message, and only it.
    let cs = c.status.clone().expect("status");
    let err = cs.last_error.clone().unwrap_or_default();
    assert!(err.contains("layer"), "unclear error: {err}");
    assert_eq!(cs.attempts, 2, "retried up to max attempts");
    assert_eq!(owners(&c), ["shared"]);

    // Policy status: counts, conditions, the bad reference named.
    let policies: Api<AccelerationPolicy> = Api::all(client.clone());
    let team = wait_for("team policy Ready", WAIT, || async {
        let p = policies.get("team").await.ok()?;
        let s = p.status.clone()?;
        (s.ready == 2 && s.images == 2).then_some(p)
    })
    .await;
    let ts = team.status.expect("status");
    assert_eq!(ts.observed_generation, team.metadata.generation);
    assert!(
        ts.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let shared = wait_for("shared policy counts", WAIT, || async {
        let p = policies.get("shared").await.ok()?;
        let s = p.status.clone()?;
        (s.images == 3 && s.ready == 2 && s.failed == 1).then_some(s)
    })
    .await;
    let degraded = shared
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded condition");
    assert_eq!(degraded.status, "True");
    assert!(
        degraded.message.contains("missing/image:nope"),
        "{}",
        degraded.message
    );
    assert!(
        shared
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False")
    );

    // Deleting a policy: its own images are garbage-collected, shared ones stay.
    policies
        .delete("shared", &DeleteParams::background())
        .await
        .expect("delete policy");
    wait_for("base image collected", WAIT, || async {
        image_of(&images, &base).await.is_none().then_some(())
    })
    .await;
    wait_for("corrupt image collected", WAIT, || async {
        image_of(&images, &corrupt).await.is_none().then_some(())
    })
    .await;
    let a2 = wait_for("app image keeps one owner", WAIT, || async {
        let i = image_of(&images, &app).await?;
        (owners(&i) == ["team"]).then_some(i)
    })
    .await;
    assert_eq!(a2.status.expect("status").phase, Phase::Ready);

    // A controller stopped mid-build leaves the image in Building; the next one finishes it
    // without a duplicate artifact.
    stop_controller(stop, handle).await;
    let fresh = push_image(&reg, "team/fresh", "v1", "fresh");
    create_policy(
        &client,
        "later",
        json!({"images": [format!("{host}/team/fresh:v1")], "platforms": [plat]}),
    )
    .await;
    let later = policies.get("later").await.expect("policy");
    let key =
        talaria_controller::builder::acceleration_key(Profile::StartupLocalV1, &Default::default());
    let name = talaria_controller::policy::image_name(&fresh, &plat, &key);
    let img: AcceleratedImage = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AcceleratedImage",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": "talaria.dev/v1alpha1", "kind": "AccelerationPolicy",
                "name": "later", "uid": later.uid().expect("uid"),
            }],
        },
        "spec": {
            "image": format!("{host}/team/fresh"), "digest": fresh, "platform": plat,
            "profile": "startup-local-v1", "accelerationKey": key,
        },
    }))
    .expect("image json");
    images
        .create(&PostParams::default(), &img)
        .await
        .expect("create image");
    let status = json!({
        "apiVersion": "talaria.dev/v1alpha1", "kind": "AcceleratedImage",
        "status": {"phase": "Building", "attempts": 1},
    });
    images
        .patch_status(
            &name,
            &PatchParams::apply("test-killed-controller").force(),
            &Patch::Apply(&status),
        )
        .await
        .expect("mark Building");
    let metrics2 = Arc::new(Metrics::new());
    let (stop, handle) = common::start_controller(client.clone(), metrics2.clone());
    let f = wait_phase(&images, &fresh, Phase::Ready).await;
    assert_eq!(f.name_any(), name);
    assert_eq!(f.status.expect("status").attempts, 2);
    let store = RegistryStore::new(
        RegistryClient::new(RegistryConfig::default()).expect("client"),
        ImageRef::parse(&format!("{host}/team/fresh:v1"))
            .expect("ref")
            .repository,
    );
    let arts = list_artifacts(&store, &fresh).await.expect("list");
    assert_eq!(arts.len(), 2, "no duplicate artifacts: {arts:?}");
    // The already-Ready images were not rebuilt by the new controller.
    assert_eq!(
        metric(
            &metrics2,
            "talaria_controller_builds_total{result=\"built\"}"
        ),
        1
    );

    stop_controller(stop, handle).await;
}
