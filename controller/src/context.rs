//! State shared by the reconcilers: clients, caches of watched objects, limits, metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use talaria_api::{AcceleratedImage, AccelerationPolicy};
use talaria_artifact::auth::Credentials;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::registry::{ArtifactBuilder, Resolver};

pub const FIELD_MANAGER: &str = "talaria-controller";
/// Annotation on an AcceleratedImage: the reference it was first resolved from (for humans).
pub const ANN_REFERENCE: &str = "talaria.dev/reference";
/// Annotation on an AcceleratedImage: `namespace/name` of the pull secrets of the pods that
/// run it, so its build can authenticate like the pods do.
pub const ANN_PULL_SECRETS: &str = "talaria.dev/pull-secrets";
/// Label on an AcceleratedImage: its acceleration key.
pub const LABEL_KEY: &str = "talaria.dev/acceleration-key";

/// Errors of one reconcile; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
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

pub struct Ctx {
    pub client: Client,
    pub policies: Store<AccelerationPolicy>,
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub images: Store<AcceleratedImage>,
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
}

impl Ctx {
    /// Publishes an event about an object; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(truncate(&note, 1000)),
            action: reason.to_string(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
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
}
