//! A CRI image-service proxy: kubelet's `--image-service-endpoint` points here, and every
//! `runtime.v1.ImageService` call is forwarded to containerd's CRI socket as raw bytes, so
//! fields this code does not model pass through unchanged.
//!
//! Why: kubelet resolves an image's pull secret and sends the credential with each
//! `PullImage`; containerd uses it once and forgets it. The lazy layer reads of the node
//! happen later, from the FUSE mounts, and need the same credential. So on a `PullImage`
//! carrying an `AuthConfig`, the credential is remembered (in memory only, bounded and
//! expiring, see [`LearnedCredentials`]) for the image's registry host and repository
//! before the call is forwarded, and the node's registry client asks for it at request time.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use prost::Message;
use talaria_artifact::oci::registry::ImageRef;
use talaria_artifact::oci::registry::credentials::{Credential, LearnedCredentials, Offer};
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::{NamedService, UnaryService};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

mod pb {
    tonic::include_proto!("runtime.v1");
}

/// The gRPC service proxied.
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";

/// Called with the image reference of a `PullImage` whose image is not present yet.
pub type PullHook = Arc<dyn Fn(&str) + Send + Sync>;
/// Largest message either way: kubelet's own CRI client limit (image lists of big nodes).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Errors of the proxy's setup and serving.
#[derive(Debug, thiserror::Error)]
pub enum CriProxyError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the CRI image service on {socket}: {source}")]
    Serve {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The proxy: forwards to containerd, learns pull credentials, and tells the node a pull
/// of a new image began.
#[derive(Clone)]
pub struct ImageServiceProxy {
    upstream: Channel,
    learned: Arc<LearnedCredentials>,
    on_pull: Option<PullHook>,
}

impl ImageServiceProxy {
    pub fn new(upstream: Channel, learned: Arc<LearnedCredentials>) -> Self {
        ImageServiceProxy {
            upstream,
            learned,
            on_pull: None,
        }
    }

    /// `hook` runs when a `PullImage` of an image containerd does not have arrives, while
    /// the call is forwarded: the node starts on the image's artifact before containerd's
    /// own resolution reaches the snapshotter.
    pub fn with_pull_hook(mut self, hook: PullHook) -> Self {
        self.on_pull = Some(hook);
        self
    }

    /// Whether containerd already has `image` (`None`: it could not say).
    async fn present(&self, image: &str) -> Option<bool> {
        let req = pb::ImageStatusRequest {
            image: Some(pb::ImageSpec {
                image: image.to_string(),
            }),
        };
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone());
        grpc.ready().await.ok()?;
        let out = grpc
            .unary(
                Request::new(Bytes::from(req.encode_to_vec())),
                http::uri::PathAndQuery::from_static(IMAGE_STATUS),
                RawCodec,
            )
            .await
            .ok()?;
        let resp = pb::ImageStatusResponse::decode(out.into_inner()).ok()?;
        Some(resp.image.is_some_and(|i| !i.id.is_empty()))
    }

    /// Runs the pull hook for `image` unless containerd has it already.
    fn warm(&self, image: String) {
        let Some(hook) = self.on_pull.clone() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            match me.present(&image).await {
                Some(true) => debug!(image, "pulled image already present; nothing to warm"),
                // Unknown counts as absent: warming costs one resolution at worst.
                _ => hook(&image),
            }
        });
    }

    /// A proxy to containerd's CRI socket, connected on first use (containerd may start
    /// after the node).
    pub fn to_unix_socket(containerd: &Path, learned: Arc<LearnedCredentials>) -> Self {
        let socket: PathBuf = containerd.to_path_buf();
        let upstream = Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let s = socket.clone();
                async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
            }));
        Self::new(upstream, learned)
    }

    /// Offers the credential of a `PullImageRequest` (given as its wire bytes) while the
    /// pull runs, and returns its image reference. A request that does not decode is still
    /// forwarded: containerd gives the answer.
    fn learn(&self, body: &[u8]) -> Option<(String, Option<Offer>)> {
        let req = match pb::PullImageRequest::decode(body) {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "PullImage request does not decode; forwarded as is");
                return None;
            }
        };
        let image = req.image.map(|i| i.image).unwrap_or_default();
        let r = match ImageRef::parse(&image) {
            Ok(r) => r,
            Err(e) => {
                debug!(image, error = %e, "PullImage of an unparsable reference; not looked at further");
                return None;
            }
        };
        let offer = req.auth.as_ref().and_then(credential_of).and_then(|c| {
            self.learned
                .offer(&r.repository.registry, &r.repository.name, c)
        });
        Some((image, offer))
    }

    /// Keeps an offered credential when its pull succeeded, drops it when it failed: a pull
    /// with a wrong secret never replaces a credential that works.
    fn settle(&self, offer: Offer, pulled: bool) {
        if pulled {
            let changed = self.learned.confirm(offer);
            // Never the secret: only where it applies and whether it is new.
            info!(changed, "pull credential kept after a successful pull");
        } else {
            self.learned.withdraw(offer);
            debug!("pull failed; its credential is not kept");
        }
    }

    async fn forward(
        self,
        path: http::uri::PathAndQuery,
        req: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let (mut metadata, _, body) = req.into_parts();
        let mut offer = None;
        if path.path() == PULL_IMAGE
            && let Some((image, o)) = self.learn(&body)
        {
            offer = o;
            // After the credential is offered: the warm-up may need it.
            self.warm(image);
        }
        // Compression is negotiated per hop: ours has none, so the caller's encodings
        // must not reach containerd (it would answer in an encoding we cannot read).
        for h in ["grpc-accept-encoding", "grpc-encoding", "content-length"] {
            metadata.remove(h);
        }
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready().await.map_err(|e| {
            warn!(error = %e, "containerd CRI socket unavailable");
            Status::unavailable(format!("containerd CRI socket: {e}"))
        })?;
        let out = grpc
            .unary(
                Request::from_parts(metadata, Default::default(), body),
                path,
                RawCodec,
            )
            .await;
        if let Some(o) = offer {
            self.settle(o, out.is_ok());
        }
        let out = out?;
        let (mut metadata, body, _) = out.into_parts();
        for h in ["grpc-encoding", "grpc-accept-encoding", "content-length"] {
            metadata.remove(h);
        }
        Ok(Response::from_parts(metadata, body, Default::default()))
    }
}

/// The credential an `AuthConfig` carries, in containerd's order of preference.
fn credential_of(a: &pb::AuthConfig) -> Option<Credential> {
    if !a.registry_token.is_empty() {
        return Some(Credential::Bearer(a.registry_token.clone()));
    }
    if !a.username.is_empty() {
        return Some(Credential::Basic {
            username: a.username.clone(),
            password: a.password.clone(),
        });
    }
    if !a.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok());
        match decoded.as_deref().and_then(|t| t.split_once(':')) {
            Some((u, p)) => {
                return Some(Credential::Basic {
                    username: u.to_string(),
                    password: p.to_string(),
                });
            }
            None => debug!("PullImage auth field is not base64 of user:password; ignored"),
        }
    }
    if !a.identity_token.is_empty() {
        // As from a docker config: used as a bearer token.
        return Some(Credential::Bearer(a.identity_token.clone()));
    }
    None
}

/// A codec over whole messages as bytes: nothing decoded, nothing lost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One forwarded method.
struct Forward {
    proxy: ImageServiceProxy,
    path: http::uri::PathAndQuery,
}

impl UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = futures::future::BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(self.proxy.clone().forward(self.path.clone(), req))
    }
}

impl NamedService for ImageServiceProxy {
    const NAME: &'static str = IMAGE_SERVICE;
}

impl<B> tower::Service<http::Request<B>> for ImageServiceProxy
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req
            .uri()
            .path_and_query()
            .filter(|p| {
                p.path()
                    .strip_prefix("/runtime.v1.ImageService/")
                    .is_some_and(|m| !m.is_empty() && !m.contains('/'))
            })
            .cloned();
        let proxy = self.clone();
        Box::pin(async move {
            let Some(path) = path else {
                return Ok(
                    Status::unimplemented("not a runtime.v1.ImageService method").into_http(),
                );
            };
            // Every ImageService method is unary.
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.unary(Forward { proxy, path }, req).await)
        })
    }
}

/// Serves the proxy on a unix socket until `shutdown` resolves. A stale socket file is
/// replaced.
pub async fn serve_unix(
    proxy: ImageServiceProxy,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), CriProxyError> {
    let io = |context: String| move |source| CriProxyError::Io { context, source };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("removing stale {}", socket.display()))(e)),
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(io(format!("binding {}", socket.display())))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    info!(socket = %socket.display(), "serving the CRI image service proxy");
    let res = tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    res.map_err(|source| CriProxyError::Serve {
        socket: socket.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_auth_config() {
        let basic = pb::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            credential_of(&basic),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        let field = pb::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("a:b:c"),
            ..Default::default()
        };
        assert_eq!(
            credential_of(&field),
            Some(Credential::Basic {
                username: "a".into(),
                password: "b:c".into()
            })
        );
        let token = pb::AuthConfig {
            registry_token: "t".into(),
            username: "u".into(),
            ..Default::default()
        };
        assert_eq!(credential_of(&token), Some(Credential::Bearer("t".into())));
        let bad = pb::AuthConfig {
            auth: "!!!".into(),
            ..Default::default()
        };
        assert_eq!(credential_of(&bad), None);
        assert_eq!(credential_of(&pb::AuthConfig::default()), None);
    }

    #[tokio::test]
    async fn pull_request_learns_host_and_repository_and_ignores_garbage() {
        let learned = Arc::new(LearnedCredentials::new(4, Duration::from_secs(60)));
        let ch = Endpoint::from_static("http://localhost").connect_lazy();
        let proxy = ImageServiceProxy::new(ch, learned.clone());
        proxy.learn(b"\xff\xff\xff garbage");
        let mut req = pb::PullImageRequest {
            image: Some(pb::ImageSpec {
                image: "reg.example:5000/team/app:v1".into(),
            }),
            auth: Some(pb::AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        // A field this code does not model (sandbox_config = 3) must not stop decoding.
        req.extend_from_slice(&[0x1a, 0x02, 0x08, 0x01]);
        let (image, offer) = proxy.learn(&req).expect("decoded");
        assert_eq!(image, "reg.example:5000/team/app:v1");
        use talaria_artifact::oci::registry::credentials::CredentialSource;
        // Offered while the pull runs; kept only once it succeeded.
        assert!(matches!(
            learned.lookup("reg.example:5000", "team/app"),
            Some(Credential::Basic { .. })
        ));
        proxy.settle(offer.expect("a credential"), true);
        assert_eq!(learned.len(), 1);
        // A second pull with another secret that fails: the first stays.
        let bogus = pb::PullImageRequest {
            image: Some(pb::ImageSpec {
                image: "reg.example:5000/team/app:v2".into(),
            }),
            auth: Some(pb::AuthConfig {
                username: "u".into(),
                password: "bogus".into(),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        let (_, offer) = proxy.learn(&bogus).expect("decoded");
        proxy.settle(offer.expect("a credential"), false);
        assert_eq!(
            learned.lookup("reg.example:5000", "team/app"),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
    }
}
