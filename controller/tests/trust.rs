//! The controller pins only artifacts it produced itself: a referrer carrying the
//! controller's (public, deterministic) acceleration key, planted by someone else, is not
//! adopted. Real kube-apiserver + etcd and a real registry.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_artifact::build::{BuildOptions, build};
use talaria_artifact::discover;
use talaria_artifact::format::{self, ArtifactSpec, IndexedLayer, Knobs, Profile};
use talaria_artifact::oci::registry::{ImageRef, RegistryClient, RegistryConfig};
use talaria_artifact::oci::store::{RegistryStore, Store};
use talaria_artifact::oci::{self, Platform};
use talaria_artifact::signature::{self, SigningKey, TrustedKeys};
use talaria_controller::metrics::Metrics;
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{self, Image, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;

const WAIT: Duration = Duration::from_secs(120);

fn image(seed: &str) -> Image {
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/seed", seed.as_bytes().to_vec(), 0o644)
        .file("bin/app", seed.as_bytes().repeat(20_000), 0o755)
        .build()
        .expect("layer");
    ImageBuilder::new()
        .layer(layer)
        .cmd(&["/bin/app"])
        .build()
        .expect("image")
}

fn store(client: &RegistryClient, host: &str, repo: &str) -> Arc<dyn Store> {
    let r = ImageRef::parse(&format!("{host}/{repo}:x")).expect("reference");
    Arc::new(RegistryStore::new(client.clone(), r.repository))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_artifact_with_the_controllers_key_is_not_adopted() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let host = reg.host();
    let kube = KubeApi::start().await.expect("control plane");
    let kclient = kube.client().await.expect("client");
    common::apply_crds(&kclient).await;

    let victim = image("victim");
    let victim_digest = victim.push(&host, "team/app", "v1").expect("push victim");
    let other = image("other");
    other.push(&host, "team/other", "v1").expect("push other");
    let rc = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let app = store(&rc, &host, "team/app");
    let other_store = store(&rc, &host, "team/other");

    // The attacker: an honest index of another layer, relabelled as the victim's layer, in
    // an artifact with the controller's key, newer than anything, as the image's referrer.
    let plat = Platform::host();
    let opts = BuildOptions {
        platform: plat.clone(),
        profile: Profile::Default,
        ..BuildOptions::default()
    };
    let other_art = build(other_store.clone(), "v1", None, &opts)
        .await
        .expect("index the other image");
    let other_layer = &other_art.layers[0];
    let index = other_layer.index.clone().expect("indexed");
    for d in std::iter::once(&index).chain(other_layer.windows.as_ref()) {
        let blob = other_store
            .get_blob(&d.digest, 64 << 20)
            .await
            .expect("blob");
        let put = app.put_blob(&d.media_type, blob).await.expect("plant blob");
        assert_eq!(put.digest, d.digest);
    }
    // The artifact's config is the empty JSON blob.
    app.put_blob(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec().into())
        .await
        .expect("empty config");
    let subject = app
        .get_manifest(&victim_digest)
        .await
        .expect("victim manifest")
        .descriptor();
    let knobs = Knobs::default();
    let planted = format::build_manifest(ArtifactSpec {
        subject,
        profile: Profile::Default,
        knobs: &knobs,
        layers: vec![IndexedLayer {
            layer_digest: victim.layers[0].digest.clone(),
            index,
            windows: other_layer.windows.clone(),
        }],
        skipped: vec![],
        plan: None,
        startup_paths: vec![],
        plan_recorded: false,
        pack: None,
        created: Some("2099-01-01T00:00:00Z".into()),
    })
    .expect("planted manifest");
    let planted_desc = app
        .put_manifest(&planted, None)
        .await
        .expect("plant manifest");
    let planted_digest = planted_desc.digest.clone();
    app.add_referrer(&victim_digest, &planted_desc)
        .await
        .expect("plant referrer");
    let key = format::acceleration_key(Profile::Default, &knobs);
    let found = discover::find_by_key(app.as_ref(), &victim_digest, &key)
        .await
        .expect("referrers")
        .expect("the planted artifact is found by key");
    assert_eq!(
        found.descriptor.digest, planted_digest,
        "precondition: the key finds the planted artifact"
    );

    // The controller builds the victim's artifact from its own layers and pins that.
    let metrics = Arc::new(Metrics::new());
    let (stop, handle) = common::start_controller(kclient.clone(), metrics);
    let policies: Api<AccelerationPolicy> = Api::all(kclient.clone());
    let p: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": {"name": "app"},
        "spec": {
            "images": [format!("{host}/team/app:v1")],
            "profile": "default",
            "platforms": [format!("linux/{}", images::oci_arch())],
        },
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &p)
        .await
        .expect("create policy");
    let images_api: Api<AcceleratedImage> = Api::all(kclient.clone());
    let img = common::wait_phase(&images_api, &victim_digest, Phase::Ready, WAIT).await;
    let st = img.status.expect("status");
    let pinned = st.artifact.expect("pinned artifact");
    assert_ne!(
        pinned.digest, planted_digest,
        "the planted artifact is pinned"
    );
    assert_ne!(
        st.default_artifact.map(|a| a.digest),
        Some(planted_digest.clone())
    );
    // What is pinned indexes the victim's own layer.
    let raw = app.get_manifest(&pinned.digest).await.expect("pinned");
    let info = format::parse_artifact(&raw).expect("artifact");
    let d = info
        .index_for(&victim.layers[0].digest)
        .expect("the victim's layer is indexed");
    let ix = discover::load_index(app.as_ref(), d)
        .await
        .expect("pinned index");
    assert_eq!(
        format!("sha256:{}", hex::encode(ix.compressed_digest)),
        victim.layers[0].digest,
        "the pinned index is of the victim's layer"
    );
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("controller stops")
        .expect("controller task");
}

/// Hostile images in a policy's scope, built by the `talaria-controller` binary: a layer of
/// 1.1 million entries (over the indexer's cap), an image behind a registry whose error
/// bodies never end, and an image with a flood of planted referrers (the controller lists
/// none: it reuses only what it built). Each fails only itself, the honest image is Ready,
/// and the controller's peak RSS stays under the chart's 1 GiB memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_fail_only_themselves_within_the_controller_memory_limit() {
    const LIMIT: u64 = 1 << 30;
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let host = reg.host();
    let kube = KubeApi::start().await.expect("control plane");
    let kclient = kube.client().await.expect("client");
    common::apply_crds(&kclient).await;
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": "talaria-system"}})).expect("ns");
    Api::<k8s_openapi::api::core::v1::Namespace>::all(kclient.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");

    let fine = image("fine");
    let fine_digest = fine.push(&host, "team/fine", "v1").expect("push");
    // 1.1 million empty files: ~0.6 GB of tar headers, a few MB gzipped.
    let mut many = LayerBuilder::new();
    for i in 0..1_100_000u32 {
        many = many.file(&format!("f/{i:07}"), Vec::new(), 0o644);
    }
    let bomb = ImageBuilder::new()
        .layer(many.build().expect("layer"))
        .cmd(&["/bin/true"])
        .build()
        .expect("image");
    let bomb_digest = bomb.push(&host, "team/bomb", "v1").expect("push");
    let flood = image("flood");
    let flood_digest = flood.push(&host, "team/flood", "v1").expect("push");
    let rc = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let flood_store = store(&rc, &host, "team/flood");
    flood_store
        .put_blob(oci::OCI_EMPTY, oci::EMPTY_JSON.to_vec().into())
        .await
        .expect("empty config");
    let subject = flood_store
        .get_manifest(&flood_digest)
        .await
        .expect("manifest")
        .descriptor();
    let knobs = Knobs::default();
    for i in 0..100 {
        let raw = format::build_manifest(ArtifactSpec {
            subject: subject.clone(),
            profile: Profile::Default,
            knobs: &knobs,
            layers: vec![],
            skipped: vec![],
            plan: None,
            startup_paths: vec![],
            plan_recorded: false,
            pack: None,
            created: Some(format!("2099-01-01T00:00:{:02}Z", i % 60)),
        })
        .expect("flood manifest");
        let d = flood_store.put_manifest(&raw, None).await.expect("push");
        flood_store
            .add_referrer(&flood_digest, &d)
            .await
            .expect("referrer");
    }
    let hostile = talaria_testenv::hostile::endless_error_registry().expect("hostile registry");

    let port = talaria_testenv::free_port().expect("port");
    let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_talaria-controller"))
        .env("KUBECONFIG", kube.kubeconfig())
        .env("RUST_LOG", "info")
        .args([
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--lease-namespace",
            "talaria-system",
            "--max-attempts",
            "1",
            "--backoff-base-seconds",
            "1",
            "--log-format",
            "text",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start talaria-controller");
    let policies: Api<AccelerationPolicy> = Api::all(kclient.clone());
    let p: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": {"name": "hostile"},
        "spec": {
            "images": [
                format!("{host}/team/fine:v1"),
                format!("{host}/team/bomb:v1"),
                format!("{host}/team/flood:v1"),
                format!("{hostile}/team/broken:v1"),
            ],
            "profile": "default",
            "platforms": [format!("linux/{}", images::oci_arch())],
        },
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &p)
        .await
        .expect("create policy");
    let images_api: Api<AcceleratedImage> = Api::all(kclient.clone());
    common::wait_phase(&images_api, &fine_digest, Phase::Ready, WAIT).await;
    common::wait_phase(&images_api, &flood_digest, Phase::Ready, WAIT).await;
    let failed = common::wait_phase(&images_api, &bomb_digest, Phase::Failed, WAIT).await;
    let why = serde_json::to_string(&failed.status).unwrap_or_default();
    assert!(
        why.contains("entries"),
        "the bomb fails on the entry cap: {why}"
    );
    // The unreachable image: reported on the policy, nothing else harmed.
    let broken = common::wait_for("the policy reports the broken image", WAIT, || {
        let policies = policies.clone();
        let hostile = hostile.clone();
        async move {
            let p = policies.get("hostile").await.ok()?;
            let st = serde_json::to_string(&p.status?).ok()?;
            st.contains(&hostile).then_some(st)
        }
    })
    .await;
    eprintln!("policy status: {broken}");
    let peak = talaria_testenv::hostile::peak_rss(controller.id()).expect("VmHWM");
    eprintln!("controller peak RSS {} MiB", peak >> 20);
    assert!(peak < LIMIT, "controller peak RSS {} MiB", peak >> 20);
    assert!(
        controller.try_wait().expect("wait").is_none(),
        "the controller died"
    );
    let _ = controller.kill();
    let _ = controller.wait();
}

/// With a signing key, the controller signs every artifact it builds, cosign-compatibly:
/// the pinned (accelerated) artifact and the default one verify with its public key and
/// not with another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_signs_every_artifact_built() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let host = reg.host();
    let kube = KubeApi::start().await.expect("control plane");
    let kclient = kube.client().await.expect("client");
    common::apply_crds(&kclient).await;
    let img = image("signed");
    let digest = img.push(&host, "team/signed", "v1").expect("push");

    let (private, public) = SigningKey::generate().expect("key");
    let (_, stranger) = SigningKey::generate().expect("key");
    let settings = talaria_controller::Settings {
        build: talaria_controller::BuildSettings {
            max_concurrent: 2,
            max_per_registry: 2,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            max_attempts: 2,
            timeout: Duration::from_secs(120),
        },
        signing_key: Some(Arc::new(SigningKey::from_pem(&private).expect("key"))),
        ..Default::default()
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let client = kclient.clone();
    let handle = tokio::spawn(async move {
        talaria_controller::run(client, settings, metrics, None, None, rx)
            .await
            .expect("controller run");
    });
    let policies: Api<AccelerationPolicy> = Api::all(kclient.clone());
    let p: AccelerationPolicy = serde_json::from_value(json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "metadata": {"name": "signed"},
        "spec": {
            "images": [format!("{host}/team/signed:v1")],
            "platforms": [format!("linux/{}", images::oci_arch())],
        },
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &p)
        .await
        .expect("create policy");
    let images_api: Api<AcceleratedImage> = Api::all(kclient.clone());
    let ready = common::wait_phase(&images_api, &digest, Phase::Ready, WAIT).await;
    let st = ready.status.expect("status");
    let rc = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let s = store(&rc, &host, "team/signed");
    let ours = TrustedKeys::from_pem(&public).expect("key");
    let theirs = TrustedKeys::from_pem(&stranger).expect("key");
    let pinned = st.artifact.expect("artifact").digest;
    let default = st.default_artifact.expect("default artifact").digest;
    assert_ne!(pinned, default, "the policy's profile has a plan");
    for d in [&pinned, &default] {
        signature::verify(s.as_ref(), d, &ours)
            .await
            .unwrap_or_else(|e| panic!("{d} not signed: {e}"));
        assert!(signature::verify(s.as_ref(), d, &theirs).await.is_err());
    }
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("controller stops")
        .expect("controller task");
}

/// With `artifactRepositories` set, a policy naming another artifact repository builds
/// nothing there: its image fails with the reason, an allowed one is Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_repository_outside_the_allowlist_is_refused() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let host = reg.host();
    let kube = KubeApi::start().await.expect("control plane");
    let kclient = kube.client().await.expect("client");
    common::apply_crds(&kclient).await;
    let allowed = image("allowed");
    let allowed_digest = allowed.push(&host, "team/allowed", "v1").expect("push");
    let elsewhere = image("elsewhere");
    let elsewhere_digest = elsewhere.push(&host, "team/elsewhere", "v1").expect("push");
    let settings = talaria_controller::Settings {
        build: talaria_controller::BuildSettings {
            max_concurrent: 2,
            max_per_registry: 2,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            max_attempts: 1,
            timeout: Duration::from_secs(120),
        },
        artifact_repositories: talaria_controller::context::ArtifactRepositories::from_list(&[
            format!("{host}/talaria"),
        ]),
        ..Default::default()
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let client = kclient.clone();
    let handle = tokio::spawn(async move {
        talaria_controller::run(client, settings, Arc::new(Metrics::new()), None, None, rx)
            .await
            .expect("controller run");
    });
    let policies: Api<AccelerationPolicy> = Api::all(kclient.clone());
    for (name, repo) in [
        ("allowed", "talaria/artifacts"),
        ("elsewhere", "attacker/loot"),
    ] {
        let p: AccelerationPolicy = serde_json::from_value(json!({
            "apiVersion": "talaria.dev/v1alpha1",
            "kind": "AccelerationPolicy",
            "metadata": {"name": name},
            "spec": {
                "images": [format!("{host}/team/{name}:v1")],
                "profile": "default",
                "platforms": [format!("linux/{}", images::oci_arch())],
                "artifactRepository": format!("{host}/{repo}"),
            },
        }))
        .expect("policy");
        policies
            .create(&PostParams::default(), &p)
            .await
            .expect("create policy");
    }
    let images_api: Api<AcceleratedImage> = Api::all(kclient.clone());
    common::wait_phase(&images_api, &allowed_digest, Phase::Ready, WAIT).await;
    let failed = common::wait_phase(&images_api, &elsewhere_digest, Phase::Failed, WAIT).await;
    let why = serde_json::to_string(&failed.status).unwrap_or_default();
    assert!(why.contains("not one the controller may push to"), "{why}");
    // Nothing was pushed there.
    let rc = RegistryClient::new(RegistryConfig::default()).expect("registry client");
    let loot = store(&rc, &host, "attacker/loot");
    assert!(
        discover::list_artifacts(loot.as_ref(), &elsewhere_digest)
            .await
            .map(|a| a.is_empty())
            .unwrap_or(true)
    );
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("controller stops")
        .expect("controller task");
}
