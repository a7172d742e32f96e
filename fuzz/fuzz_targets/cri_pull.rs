//! The CRI image-service proxy never panics on any request body: it answers every call with a gRPC status (containerd being unreachable here), keeps no credential of a failed pull, and warms exactly the image an independent decoding of the PullImageRequest finds.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use talaria_artifact::oci::registry::ImageRef;
use talaria_artifact::oci::registry::credentials::LearnedCredentials;
use talaria_artifact_fuzz::cri::PullImageRequest;
use talaria_node::cri::proxy::{IMAGE_SERVICE, ImageServiceProxy};
use tokio::sync::mpsc;
use tower::Service;

struct World {
    rt: tokio::runtime::Runtime,
    proxy: ImageServiceProxy,
    learned: Arc<LearnedCredentials>,
    warmed: std::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _in = rt.enter();
        let learned = Arc::new(LearnedCredentials::new(64, Duration::from_secs(600)));
        let (tx, rx) = mpsc::unbounded_channel();
        // No containerd: every forwarded call fails to connect, as when containerd is down.
        let proxy = ImageServiceProxy::to_unix_socket(
            std::path::Path::new("/nonexistent/talaria-fuzz/containerd.sock"),
            learned.clone(),
        )
        .with_pull_hook(Arc::new(move |image: &str| {
            let _ = tx.send(image.to_string());
        }));
        World {
            rt,
            proxy,
            learned,
            warmed: std::sync::Mutex::new(rx),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let w = world();
    let mut warmed = w.warmed.lock().unwrap();
    if let Ok(stale) = warmed.try_recv() {
        panic!("an earlier input warmed {stale:?}, which the reference decoding did not expect");
    }
    let method = match mode % 4 {
        0 | 1 => "PullImage",
        2 => "ImageStatus",
        _ => "",
    };
    let path = if mode % 8 == 7 {
        "/runtime.v1.RuntimeService/Version".to_string()
    } else {
        format!("/{IMAGE_SERVICE}/{method}")
    };
    // One uncompressed gRPC frame holding the message.
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    let req = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .expect("request");
    let mut proxy = w.proxy.clone();
    let resp = w
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), proxy.call(req)).await })
        .expect("the proxy answers within 10 s")
        .expect("infallible");
    let status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .expect("a trailers-only gRPC status")
        .to_string();
    assert_ne!(status, "0", "nothing upstream, yet a call succeeded");
    assert!(w.learned.is_empty(), "a failed pull left a credential");

    // The reference decoding: a PullImage of a parseable reference warms that image.
    let expected = (path.ends_with("/PullImage"))
        .then(|| PullImageRequest::decode(body).ok())
        .flatten()
        .map(|r| r.image.map(|i| i.image).unwrap_or_default())
        .filter(|image| ImageRef::parse(image).is_ok());
    if let Some(image) = expected {
        let got = w
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), warmed.recv()).await })
            .expect("the pull hook runs within 10 s")
            .expect("hook channel open");
        assert_eq!(got, image, "warmed another image than the request names");
    }
});
