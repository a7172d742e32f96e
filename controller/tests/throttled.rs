//! A registry that answers 429 (Retry-After) for a while: resolution and builds retry and
//! finish. The registry is real; a TCP front refuses its first connections with 429.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::wait_for;
use kube::api::{Api, PostParams};
use serde_json::json;
use talaria_api::{AcceleratedImage, AccelerationPolicy, Phase};
use talaria_controller::metrics::Metrics;
use talaria_controller::{BuildSettings, Settings};
use talaria_testenv::apiserver::KubeApi;
use talaria_testenv::images::{self, ImageBuilder, LayerBuilder};
use talaria_testenv::registry::Registry;
use tokio::sync::watch;

const THROTTLED: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_retry_through_429_and_finish() {
    talaria_controller::install_crypto_provider();
    common::init_logs();
    let reg = Registry::start().expect("registry");
    let kube = KubeApi::start().await.expect("control plane");
    let client = kube.client().await.expect("client");
    common::apply_crds(&client).await;

    let layer = LayerBuilder::new()
        .file("bin/tool", vec![3u8; 300_000], 0o755)
        .build()
        .expect("layer");
    let img = ImageBuilder::new().layer(layer).build().expect("image");
    let digest = img.push(&reg.host(), "slow/tool", "v1").expect("push");
    let (front, served) = common::throttling_front(reg.host(), THROTTLED).await;

    let metrics = Arc::new(Metrics::new());
    let settings = Settings {
        build: BuildSettings {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            max_attempts: 6,
            ..Default::default()
        },
        resolve_error_ttl: Duration::from_millis(500),
        ..Default::default()
    };
    let (stop, rx) = watch::channel(false);
    let c2 = client.clone();
    let m2 = metrics.clone();
    let handle = tokio::spawn(async move {
        talaria_controller::run(c2, settings, m2, None, None, rx)
            .await
            .expect("controller");
    });

    let policy: AccelerationPolicy = serde_json::from_value(json!({
        "metadata": {"name": "slow"},
        "spec": {
            "images": [format!("{front}/slow/tool:v1")],
            "platforms": [format!("linux/{}", images::oci_arch())],
        },
    }))
    .expect("policy");
    Api::<AccelerationPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");

    let images: Api<AcceleratedImage> = Api::all(client.clone());
    let ready = wait_for(
        "image Ready through 429s",
        Duration::from_secs(60),
        || async {
            let list = images.list(&Default::default()).await.ok()?;
            let i = list.items.into_iter().find(|i| i.spec.digest == digest)?;
            (i.status.as_ref()?.phase == Phase::Ready).then_some(i)
        },
    )
    .await;
    let st = ready.status.expect("status");
    assert!(st.artifact.is_some());
    assert_eq!(
        st.artifact.expect("artifact").repository,
        format!("{front}/slow/tool")
    );
    assert!(
        served.load(Ordering::SeqCst) > THROTTLED,
        "every 429 was served and later requests went through"
    );

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("controller stops")
        .expect("controller task");
}
