//! State shared by the reconcilers: clients, caches of watched objects, limits, metrics; their
//! error type; helpers for events and conditions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;
use kube::{Client, Resource};
use talaria_api::{AcceleratedImage, AccelerationPolicy, StartupRecord};
use talaria_artifact::oci::registry::credentials::Credentials;
use tokio::sync::Semaphore;

use crate::builder::ArtifactBuilder;
use crate::clients::ClientError;
use crate::metrics::Metrics;
use crate::resolve::Resolver;

pub const FIELD_MANAGER: &str = "talaria-controller";
/// Annotation on an AcceleratedImage: the reference it was first resolved from (for humans).
pub const ANN_REFERENCE: &str = "talaria.dev/reference";
/// Annotation on an AcceleratedImage: `namespace/name` of the pull secrets of the pods that
/// run it, so its build can authenticate like the pods do.
pub const ANN_PULL_SECRETS: &str = "talaria.dev/pull-secrets";
/// Label on an AcceleratedImage: its acceleration key.
pub const LABEL_KEY: &str = "talaria.dev/acceleration-key";

/// Errors of one reconcile; the controller retries with backoff and counts them by
/// [`Error::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} cache not synced yet")]
    CacheNotSynced(&'static str),
    #[error("{cache} cache stopped: {source}")]
    CacheStopped {
        cache: &'static str,
        #[source]
        source: WriterDropped,
    },
    #[error("policy {0} has no uid yet")]
    NoUid(String),
    #[error("AcceleratedImage {0} vanished; retrying")]
    Vanished(String),
    #[error("AcceleratedImage {0}: owners kept changing; retrying later")]
    OwnersChanging(String),
    #[error("build queue closed")]
    QueueClosed,
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl Error {
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            // A status code says more than "kube"; the few that matter get their own label.
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => match s.code {
                404 => "kube_not_found",
                409 => "kube_conflict",
                403 => "kube_forbidden",
                _ => "kube_api",
            },
            Error::Kube { .. } => "kube",
            Error::CacheNotSynced(_) => "cache_not_synced",
            Error::CacheStopped { .. } => "cache_stopped",
            Error::NoUid(_) => "no_uid",
            Error::Vanished(_) => "vanished",
            Error::OwnersChanging(_) => "conflict",
            Error::QueueClosed => "queue_closed",
            Error::Client(e) => e.reason(),
        }
    }
}

/// Build queue settings.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Builds running at once, over all registries.
    pub max_concurrent: usize,
    /// Builds running at once against one registry host.
    pub max_per_registry: usize,
    /// Backoff after the first failure; doubled per failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// After this many failed attempts an image stays Failed until its owners change.
    pub max_attempts: u32,
    /// A build running longer than this is abandoned and counted as failed.
    pub timeout: Duration,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            max_concurrent: 4,
            max_per_registry: 2,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
            max_attempts: 8,
            timeout: Duration::from_secs(1800),
        }
    }
}

/// Concurrency limits of the build queue.
pub struct Limits {
    pub global: Semaphore,
    per_registry: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_per_registry: usize,
}

impl Limits {
    pub fn new(s: &BuildSettings) -> Limits {
        Limits {
            global: Semaphore::new(s.max_concurrent.max(1)),
            per_registry: Mutex::new(HashMap::new()),
            max_per_registry: s.max_per_registry.max(1),
        }
    }

    pub fn registry(&self, host: &str) -> Arc<Semaphore> {
        let mut m = self.per_registry.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_registry)))
            .clone()
    }
}

/// An event a decision step wants published (the reconcile publishes it), so that what is
/// announced is decided, and tested, with the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

impl Notice {
    pub fn normal(reason: &'static str, note: String) -> Notice {
        Notice {
            warning: false,
            reason,
            note,
        }
    }

    pub fn warning(reason: &'static str, note: String) -> Notice {
        Notice {
            warning: true,
            reason,
            note,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub policies: Store<AccelerationPolicy>,
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub images: Store<AcceleratedImage>,
    /// Nodes' records of real starts (crate::learn).
    pub records: Store<StartupRecord>,
    pub resolver: Arc<dyn Resolver>,
    pub builder: Arc<dyn ArtifactBuilder>,
    pub build: BuildSettings,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    /// How often a policy is re-resolved (tags move).
    pub resync: Duration,
    /// How soon a policy with problems is reconciled again.
    pub problem_retry: Duration,
    /// Namespaces whose secrets a policy may name.
    pub secret_namespaces: SecretNamespaces,
    /// Repositories a policy's `artifactRepository` may name.
    pub artifact_repositories: ArtifactRepositories,
}

/// Repositories an `artifactRepository` may name (a policy author otherwise makes the
/// controller push, with the credentials it holds, wherever they like).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ArtifactRepositories {
    #[default]
    Any,
    /// These repositories and the ones below them (`registry/path` prefixes).
    Only(Vec<String>),
}

impl ArtifactRepositories {
    /// From the admin's list; empty allows any.
    pub fn from_list(list: &[String]) -> ArtifactRepositories {
        let only: Vec<String> = list
            .iter()
            .map(|p| p.trim().trim_end_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if only.is_empty() {
            ArtifactRepositories::Any
        } else {
            ArtifactRepositories::Only(only)
        }
    }

    pub fn allows(&self, repository: &str) -> bool {
        match self {
            ArtifactRepositories::Any => true,
            ArtifactRepositories::Only(prefixes) => prefixes.iter().any(|p| {
                repository == p
                    || repository
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }),
        }
    }
}

/// Namespaces whose secrets a policy (cluster-scoped, written by whoever may write
/// policies) may name in `registryCredentials`: the controller reads secrets everywhere,
/// so without a limit a policy author borrows any namespace's registry credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SecretNamespaces {
    /// Any namespace (the library's default, for embedding and tests).
    #[default]
    Any,
    /// These only (the binary: its own namespace plus the ones an admin lists).
    Only(std::collections::BTreeSet<String>),
}

impl SecretNamespaces {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            SecretNamespaces::Any => true,
            SecretNamespaces::Only(set) => set.contains(namespace),
        }
    }

    /// `refs` (namespace, name) without those in namespaces not allowed, each reported in
    /// `problems`.
    pub fn filter(
        &self,
        refs: impl IntoIterator<Item = (String, String)>,
        problems: &mut Vec<String>,
    ) -> Vec<(String, String)> {
        refs.into_iter()
            .filter(|(ns, name)| {
                let ok = self.allows(ns);
                if !ok {
                    problems.push(format!(
                        "secret {ns}/{name}: policies may not name secrets in namespace {ns} \
                         (allowed: the controller's namespace and controller.secretNamespaces)"
                    ));
                }
                ok
            })
            .collect()
    }
}

impl Context {
    /// Publishes an event about an object; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, notice: Notice) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let ev = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason.to_string(),
            note: Some(truncate(&notice.note, 1000)),
            action: notice.reason.to_string(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason = notice.reason, "publishing an event failed");
        }
    }

    /// Registry credentials from `kubernetes.io/dockerconfigjson` secrets; unreadable secrets
    /// are reported in `problems` and skipped.
    pub async fn credentials(
        &self,
        refs: impl IntoIterator<Item = (String, String)>,
        problems: &mut Vec<String>,
    ) -> Credentials {
        let mut out = Credentials::new();
        for (ns, name) in refs {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
            match api.get_opt(&name).await {
                Ok(Some(s)) => {
                    let data: BTreeMap<String, Vec<u8>> = s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect();
                    match Credentials::from_k8s_secret_data(&data) {
                        Ok(c) => out.merge(c),
                        Err(e) => problems.push(format!("secret {ns}/{name}: {e}")),
                    }
                }
                Ok(None) => problems.push(format!("secret {ns}/{name} not found")),
                Err(e) => problems.push(format!("reading secret {ns}/{name}: {e}")),
            }
        }
        out
    }
}

/// Cuts a message to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A condition, keeping `lastTransitionTime` of the previous one of its type when the status
/// did not change (so an unchanged status is written identically and causes no update).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: truncate(message, 32 * 1024),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_repositories_allow_listed_ones_and_below() {
        let only = ArtifactRepositories::from_list(&["reg.io/talaria/".into(), " ".into()]);
        assert!(only.allows("reg.io/talaria"));
        assert!(only.allows("reg.io/talaria/team/app"));
        assert!(!only.allows("reg.io/talaria-evil"));
        assert!(!only.allows("evil.io/talaria"));
        assert_eq!(
            ArtifactRepositories::from_list(&[]),
            ArtifactRepositories::Any
        );
        assert!(ArtifactRepositories::Any.allows("anything/at/all"));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        let s = "é".repeat(10);
        let t = truncate(&s, 8);
        assert!(t.len() <= 8 && t.ends_with("..."), "{t}");
    }

    #[test]
    fn condition_keeps_transition_time_when_status_unchanged() {
        let c1 = condition(&[], "Ready", true, "R", "m", Some(1));
        let c2 = condition(
            std::slice::from_ref(&c1),
            "Ready",
            true,
            "R2",
            "m2",
            Some(2),
        );
        assert_eq!(c1.last_transition_time, c2.last_transition_time);
        let c3 = condition(std::slice::from_ref(&c1), "Ready", false, "R", "m", Some(2));
        assert_eq!(c3.status, "False");
    }

    #[test]
    fn error_reasons_name_the_failure() {
        assert_eq!(Error::CacheNotSynced("policy").reason(), "cache_not_synced");
        assert_eq!(Error::QueueClosed.reason(), "queue_closed");
        let conflict = kube::Error::Api(
            kube::core::Status::failure("changed", "Conflict")
                .with_code(409)
                .boxed(),
        );
        assert_eq!(Error::kube("patching")(conflict).reason(), "kube_conflict");
    }
}
