//! containerd's `Snapshots` gRPC service on top of [`Snapshotter`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types::Mount as PbMount;
use crate::snapshot::metadata::{Kind, Time};
use crate::snapshot::{Info, Mount, Snapshotter};

/// How many infos one List response carries (containerd streams them in batches too).
const LIST_BATCH: usize = 100;

#[derive(Clone)]
pub struct SnapshotService {
    sn: Arc<Snapshotter>,
}

impl SnapshotService {
    pub fn new(sn: Arc<Snapshotter>) -> SnapshotService {
        SnapshotService { sn }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> pb::snapshots_server::SnapshotsServer<SnapshotService> {
        pb::snapshots_server::SnapshotsServer::new(self)
    }

    /// Runs blocking snapshotter work (fs + fsync'd transactions) off the async workers.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Snapshotter) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        let res = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{op}: worker failed: {e}")))?;
        res.map_err(|e| {
            match &e {
                crate::Error::NotFound(_) | crate::Error::AlreadyExists(_) => {
                    debug!(op, error = %e, "snapshot request")
                }
                _ => warn!(op, error = %e, "snapshot request failed"),
            }
            e.to_status()
        })
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn mounts(ms: Vec<Mount>) -> Vec<PbMount> {
    ms.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn ts(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.secs,
        nanos: i32::try_from(t.nanos).unwrap_or(0),
    }
}

fn info(i: Info) -> pb::Info {
    let kind = match i.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .run("prepare", move |sn| {
                sn.prepare(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .run("view", move |sn| {
                sn.view(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let ms = self.run("mounts", move |sn| sn.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("commit", move |sn| {
            sn.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("remove", move |sn| sn.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = self.run("stat", move |sn| sn.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(new) = r.info else {
            return Err(Status::invalid_argument("update without info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .run("update", move |sn| {
                sn.update(&new.name, labels(new.labels), &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let all = self.run("list", |sn| sn.list()).await?;
        let mut batches = Vec::new();
        let mut it = all.into_iter().map(info).peekable();
        while it.peek().is_some() {
            let batch: Vec<pb::Info> = it.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run("usage", move |sn| sn.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let n = self.run("cleanup", |sn| sn.cleanup()).await?;
        debug!(removed = n, "cleanup");
        Ok(Response::new(()))
    }
}

/// Serves the snapshots service on a unix socket until `shutdown` resolves. A stale socket
/// file at `socket` is replaced.
pub async fn serve_unix(
    sn: Arc<Snapshotter>,
    socket: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> crate::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(crate::Error::io(format!("creating {}", dir.display())))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(crate::Error::io(format!(
                "removing stale {}",
                socket.display()
            ))(e));
        }
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(crate::Error::io(format!("binding {}", socket.display())))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let res = tonic::transport::Server::builder()
        .add_service(SnapshotService::new(sn).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    res.map_err(|e| crate::Error::Io {
        context: format!("serving on {}", socket.display()),
        source: std::io::Error::other(e),
    })
}
