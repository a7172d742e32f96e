//! Artifacts from the cluster: the node watches AcceleratedImages and, for an image manifest,
//! uses the artifact of a Ready one that at least one AccelerationPolicy owns (approved).
//! Only approved objects count, so anyone able to create an AcceleratedImage without a
//! policy cannot point nodes at an artifact of their choosing.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use talaria_api::{AcceleratedImage, ArtifactRef, Phase};
use tracing::{debug, warn};

/// How long a lookup waits for the first list of the watch before using what it has.
const READY_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster config: {0}")]
    InCluster(String),
    #[error("creating the Kubernetes client: {0}")]
    Client(String),
}

/// A Kubernetes client from a kubeconfig file, or from the pod's service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClusterError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                ClusterError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }
            })?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ClusterError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        None => Config::incluster().map_err(|e| ClusterError::InCluster(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ClusterError::Client(e.to_string()))
}

/// A watched cache of the cluster's AcceleratedImages.
pub struct ClusterSource {
    store: Store<AcceleratedImage>,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource")
            .field("objects", &self.store.state().len())
            .finish()
    }
}

impl ClusterSource {
    /// Starts watching AcceleratedImages in all namespaces on the current tokio runtime.
    /// The watch retries with backoff for as long as the process lives.
    pub fn start(client: Client) -> ClusterSource {
        let api: Api<AcceleratedImage> = Api::all(client);
        let (store, writer) = reflector::store();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(img) => debug!(
                        name = img.metadata.name.as_deref().unwrap_or(""),
                        "AcceleratedImage seen"
                    ),
                    Err(e) => warn!(error = %e, "watching AcceleratedImages"),
                }
            }
        });
        ClusterSource { store }
    }

    /// The artifact of a Ready, policy-owned AcceleratedImage of `manifest` for `platform`
    /// (`os/arch`, variant ignored): its profile's artifact, else the default one.
    pub async fn lookup(&self, manifest: &str, platform: &str) -> Option<ArtifactRef> {
        if tokio::time::timeout(READY_WAIT, self.store.wait_until_ready())
            .await
            .is_err()
        {
            warn!("AcceleratedImages not listed yet; looking in what is known");
        }
        let mut found: Vec<ArtifactRef> = self
            .store
            .state()
            .iter()
            .filter(|img| img.spec.digest == manifest)
            .filter(|img| same_platform(&img.spec.platform, platform))
            .filter(|img| approved(img))
            .filter_map(|img| {
                let st = img.status.as_ref()?;
                if st.phase != Phase::Ready {
                    return None;
                }
                st.artifact.clone().or_else(|| st.default_artifact.clone())
            })
            .collect();
        // Several policies may have built the same image: a stable choice across nodes.
        found.sort_by(|a, b| a.digest.cmp(&b.digest));
        found.into_iter().next()
    }
}

/// Owned by at least one AccelerationPolicy.
fn approved(img: &AcceleratedImage) -> bool {
    img.metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|o| o.kind == "AccelerationPolicy" && o.api_version.starts_with("talaria.dev/"))
}

fn same_platform(spec: &str, node: &str) -> bool {
    spec.split('/').take(2).eq(node.split('/').take(2))
}

/// This node's platform in OCI terms (`linux/amd64`).
pub fn node_platform() -> String {
    talaria_artifact::oci::Platform::host().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_compare_without_variant() {
        assert!(same_platform("linux/arm64/v8", "linux/arm64"));
        assert!(!same_platform("linux/arm64", "linux/amd64"));
        assert!(node_platform().starts_with(std::env::consts::OS));
    }
}
