//! Artifacts from the cluster: the node watches AcceleratedImages and AccelerationPolicies
//! and, for an image manifest, uses the artifact of a Ready AcceleratedImage that a live
//! AccelerationPolicy owns (approved): an owner reference counts only when a policy of that
//! name has that UID now, so a made-up or stale owner reference approves nothing. Until
//! both watches have listed, nothing is approved: a layer is then pulled normally, never
//! looked up elsewhere (docs/trust.md).

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, Resource};
use talaria_api::{
    AcceleratedImage, AccelerationPolicy, ArtifactRef, Phase, PlanSource, RecordingSettings,
    StartupRecord, StartupRecordSpec,
};
use tracing::{debug, warn};

use crate::content::prefetch::Poisoned;

/// How long a lookup waits for the first lists of the watches; after that it answers "no
/// artifact" (a normal pull) until they are in.
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

/// Watched caches of the cluster's AcceleratedImages and AccelerationPolicies.
pub struct ClusterSource {
    client: Client,
    store: Store<AcceleratedImage>,
    policies: Store<AccelerationPolicy>,
    /// Events about AcceleratedImages (a layer that failed verification).
    recorder: Recorder,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource")
            .field("objects", &self.store.state().len())
            .finish()
    }
}

impl ClusterSource {
    /// Starts watching AcceleratedImages (all namespaces) and AccelerationPolicies on the
    /// current tokio runtime. The watches retry with backoff for as long as the process lives.
    pub fn start(client: Client) -> ClusterSource {
        let reporter = Reporter {
            controller: "talaria-node".into(),
            // The chart sets it from the pod's node; one agent per node.
            instance: std::env::var("NODE_NAME").ok(),
        };
        ClusterSource {
            client: client.clone(),
            store: watch(Api::all(client.clone()), "AcceleratedImage"),
            policies: watch(Api::all(client.clone()), "AccelerationPolicy"),
            recorder: Recorder::new(client, reporter),
        }
    }

    /// A Warning Event on every AcceleratedImage of the poisoned layer's image manifest, so
    /// `kubectl describe accimg` shows that a pinned artifact lied (docs/trust.md).
    pub async fn report_poisoned(&self, p: &Poisoned) {
        let note = format!(
            "layer {} does not match its index {} ({}); the layer is poisoned on this node and the artifact quarantined: {}",
            p.at.layer, p.at.index_digest, p.reason, p.message
        );
        let event = Event {
            type_: EventType::Warning,
            reason: "LayerVerificationFailed".into(),
            note: Some(truncate_note(note)),
            action: "VerifyLayer".into(),
            secondary: None,
        };
        let regarding: Vec<_> = self
            .store
            .state()
            .iter()
            .filter(|img| img.spec.digest == p.at.manifest)
            .map(|img| img.object_ref(&()))
            .collect();
        for r in regarding {
            if let Err(e) = self.recorder.publish(&event, &r).await {
                warn!(error = %e, object = r.name.as_deref().unwrap_or(""), "event not recorded");
            }
        }
    }

    /// A Warning Event on this agent's Node (`NODE_NAME`), for what concerns the node rather
    /// than an image (mounts a handover could not take). Without `NODE_NAME`, only logged.
    pub async fn report_node(&self, reason: &str, action: &str, note: String) {
        let Ok(node) = std::env::var("NODE_NAME") else {
            warn!(reason, note, "no NODE_NAME: event not recorded");
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(truncate_note(note)),
            action: action.into(),
            secondary: None,
        };
        let r = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.clone()),
            ..Default::default()
        };
        if let Err(e) = self.recorder.publish(&event, &r).await {
            warn!(error = %e, node, "event not recorded");
        }
    }

    /// The policy-owned AcceleratedImages of `manifest` for `platform` (`os/arch`).
    fn approved_images(
        &self,
        manifest: &str,
        platform: &str,
    ) -> Vec<std::sync::Arc<AcceleratedImage>> {
        self.store
            .state()
            .into_iter()
            .filter(|img| img.spec.digest == manifest)
            .filter(|img| same_platform(&img.spec.platform, platform))
            .filter(|img| approved(img, &self.policies))
            .collect()
    }

    /// What the learning loop wants of a start of `manifest` on `platform`: the approved,
    /// Ready AcceleratedImage whose plan it would record, if recording is on and the plan
    /// still lacks starts.
    pub fn recording_target(&self, manifest: &str, platform: &str) -> Option<RecordingTarget> {
        let mut found: Vec<RecordingTarget> = self
            .approved_images(manifest, platform)
            .iter()
            .filter_map(|img| {
                let st = img.status.as_ref()?;
                if st.phase != Phase::Ready || st.artifact.is_none() {
                    return None;
                }
                let owners: Vec<_> = owner_policies(img, &self.policies);
                let settings = RecordingSettings::of(owners.iter().map(|p| p.as_ref()));
                let merged = st.recorded_starts.len();
                let recorded = st.plan_source == Some(PlanSource::Recorded);
                let wanted = settings.enabled
                    && (!recorded
                        || merged < usize::try_from(settings.starts).unwrap_or(usize::MAX));
                wanted.then(|| RecordingTarget {
                    name: img.metadata.name.clone().unwrap_or_default(),
                    uid: img.metadata.uid.clone().unwrap_or_default(),
                    digest: img.spec.digest.clone(),
                    window: Duration::from_secs(u64::from(settings.window_seconds)),
                })
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        found.into_iter().next()
    }

    /// How the Ready AcceleratedImage of `manifest` plans its starts (`recorded`,
    /// `predicted`), for the events on pods.
    pub fn plan_source(&self, manifest: &str, platform: &str) -> Option<PlanSource> {
        self.store
            .state()
            .iter()
            .filter(|img| {
                img.spec.digest == manifest && same_platform(&img.spec.platform, platform)
            })
            .filter(|img| approved(img, &self.policies))
            .filter_map(|img| img.status.as_ref()?.plan_source)
            .max_by_key(|p| *p == PlanSource::Recorded)
    }

    /// Writes a StartupRecord owned by the AcceleratedImage it is about (so it goes with it).
    pub async fn create_record(
        &self,
        target: &RecordingTarget,
        spec: StartupRecordSpec,
    ) -> Result<String, kube::Error> {
        let api: Api<StartupRecord> = Api::all(self.client.clone());
        let mut r = StartupRecord::new("", spec);
        r.metadata.name = None;
        // Names are at most 253 characters; the suffix is the apiserver's.
        let prefix: String = target.name.chars().take(200).collect();
        r.metadata.generate_name = Some(format!("{prefix}-"));
        r.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: format!("{}/{}", talaria_api::GROUP, talaria_api::VERSION),
                kind: "AcceleratedImage".into(),
                name: target.name.clone(),
                uid: target.uid.clone(),
                ..Default::default()
            },
        ]);
        let created = api.create(&Default::default(), &r).await?;
        Ok(created.metadata.name.unwrap_or_default())
    }

    /// The pods on this node (`NODE_NAME`); empty without it or on error (logged).
    pub async fn pods_on_node(&self) -> Vec<Pod> {
        let Ok(node) = std::env::var("NODE_NAME") else {
            return Vec::new();
        };
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
        match api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                warn!(error = %e, "listing this node's pods");
                Vec::new()
            }
        }
    }

    /// Publishes an Event about `pod`.
    pub async fn report_pod(&self, pod: &Pod, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(truncate_note(note)),
            action: reason.into(),
            secondary: None,
        };
        let r = pod.object_ref(&());
        if let Err(e) = self.recorder.publish(&event, &r).await {
            warn!(error = %e, pod = r.name.as_deref().unwrap_or(""), "event not recorded");
        }
    }

    /// The artifact of a Ready, policy-owned AcceleratedImage of `manifest` for `platform`
    /// (`os/arch`, variant ignored): its profile's artifact, else the default one.
    pub async fn lookup(&self, manifest: &str, platform: &str) -> Option<ArtifactRef> {
        let listed = async {
            self.store.wait_until_ready().await?;
            self.policies.wait_until_ready().await
        };
        if !matches!(tokio::time::timeout(READY_WAIT, listed).await, Ok(Ok(()))) {
            // A partial list could approve what a policy deletion since revoked: no artifact.
            warn!("AcceleratedImages or policies not listed yet; pulling normally");
            return None;
        }
        let mut found: Vec<ArtifactRef> = self
            .approved_images(manifest, platform)
            .iter()
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

/// Watches every object of `api` into a store; errors are logged and the watch retries.
/// The API's limit for an Event's note is 1 kB.
fn truncate_note(mut note: String) -> String {
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}

fn watch<K>(api: Api<K>, kind: &'static str) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(o) => debug!(kind, name = o.meta().name.as_deref().unwrap_or(""), "seen"),
                Err(e) => warn!(kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    store
}

/// Owned by an AccelerationPolicy that exists now with the owner reference's UID. Only the
/// controller writes AcceleratedImage status (RBAC), and a policy's UID cannot be chosen,
/// so an owner reference someone else wrote (or one left from a deleted policy) approves
/// nothing.
fn approved(img: &AcceleratedImage, policies: &Store<AccelerationPolicy>) -> bool {
    !owner_policies(img, policies).is_empty()
}

/// The live policies that own `img` (see [`approved`]).
fn owner_policies(
    img: &AcceleratedImage,
    policies: &Store<AccelerationPolicy>,
) -> Vec<std::sync::Arc<AccelerationPolicy>> {
    img.metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|o| o.kind == "AccelerationPolicy" && o.api_version.starts_with("talaria.dev/"))
        .filter_map(|o| {
            policies
                .get(&reflector::ObjectRef::new(&o.name))
                .filter(|p| p.metadata.uid.as_deref() == Some(o.uid.as_str()))
        })
        .collect()
}

/// An AcceleratedImage whose plan a start on this node would add to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordingTarget {
    pub name: String,
    pub uid: String,
    pub digest: String,
    /// How long after the image's first Prepare its reads count as its start.
    pub window: Duration,
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
