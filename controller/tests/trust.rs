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
