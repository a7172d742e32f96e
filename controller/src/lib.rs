//! talaria-controller: turns AccelerationPolicies into AcceleratedImages and their artifacts.
//!
//! Two kube-runtime controllers share caches (see [`run`]):
//! - policies ([`policy`]): triggered by policy, pod (metadata and images only), namespace and
//!   AcceleratedImage changes; a pod change reconciles only the policies that select it;
//! - images ([`image`]): the build queue, one reconcile per AcceleratedImage.

pub mod builder;
pub mod clients;
pub mod context;
pub mod crdgen;
pub mod image;
pub mod learn;
pub mod metrics;
pub mod policy;
pub mod resolve;
pub mod selector;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use talaria_api::{AcceleratedImage, AccelerationPolicy, StartupRecord};
use talaria_artifact::oci::registry::RegistryConfig;
use talaria_artifact::signature::SigningKey;
use tokio::sync::watch;
use tracing::{info, warn};

use builder::{ArtifactBuilder, RegistryBuilder};
use clients::Clients;
pub use context::{BuildSettings, Context, Error};
use metrics::Metrics;
use resolve::{RegistryResolver, Resolver};

/// Quiet time before a triggered policy reconcile runs (merges bursts of triggers).
pub const POLICY_DEBOUNCE: Duration = Duration::from_millis(500);

/// Everything [`run`] needs besides the client.
#[derive(Clone, Debug)]
pub struct Settings {
    pub build: BuildSettings,
    /// Layers indexed at once within one build.
    pub layer_parallelism: usize,
    /// How often each policy is reconciled without a change (re-resolves tags).
    pub resync: Duration,
    /// How long a resolved tag is trusted.
    pub resolve_ttl: Duration,
    /// How long a failed resolution is remembered before it is retried.
    pub resolve_error_ttl: Duration,
    pub registry: RegistryConfig,
    /// This replica's name in events.
    pub instance: String,
    /// Namespaces whose secrets a policy may name.
    pub secret_namespaces: context::SecretNamespaces,
    /// Signs every artifact built (cosign-compatible), so nodes trusting its public key
    /// can use them without this cluster's pin.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Repositories a policy's `artifactRepository` may name.
    pub artifact_repositories: context::ArtifactRepositories,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            build: BuildSettings::default(),
            layer_parallelism: 2,
            resync: Duration::from_secs(300),
            resolve_ttl: Duration::from_secs(300),
            resolve_error_ttl: Duration::from_secs(30),
            registry: RegistryConfig::default(),
            instance: "talaria-controller".into(),
            secret_namespaces: context::SecretNamespaces::Any,
            signing_key: None,
            artifact_repositories: context::ArtifactRepositories::Any,
        }
    }
}

/// Selects rustls' ring back end for the process before any client exists (the one back end
/// linked; see `talaria_artifact::oci::registry::install_crypto_provider`). Later calls are no-ops.
pub fn install_crypto_provider() {
    talaria_artifact::oci::registry::install_crypto_provider();
}

fn strip_namespace(ns: &mut Namespace) {
    ns.metadata.managed_fields = None;
    ns.metadata.annotations = None;
    ns.spec = None;
    ns.status = None;
}

/// Runs both controllers until `shutdown` turns true; running reconciles finish (a build is
/// abandoned cleanly, its image handed back as Pending). `builder`/`resolver` default to the
/// registry implementations.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    builder: Option<Arc<dyn ArtifactBuilder>>,
    resolver: Option<Arc<dyn Resolver>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let clients = Clients::new(settings.registry.clone(), metrics.clone())?;
    let builder = builder.unwrap_or_else(|| {
        Arc::new(
            RegistryBuilder::new(clients.clone(), settings.layer_parallelism)
                .with_signing_key(settings.signing_key.clone()),
        )
    });
    let resolver = resolver.unwrap_or_else(|| {
        Arc::new(RegistryResolver::new(
            clients.clone(),
            settings.resolve_ttl,
            settings.resolve_error_ttl,
        ))
    });

    let policies_api: Api<AccelerationPolicy> = Api::all(client.clone());
    let images_api: Api<AcceleratedImage> = Api::all(client.clone());
    // Debounced: a burst of image status changes coalesces into one policy reconcile.
    let pc = Controller::new(policies_api.clone(), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().debounce(POLICY_DEBOUNCE));
    let ic = Controller::new(images_api.clone(), watcher::Config::default());
    let policies = pc.store();
    let images = ic.store();

    // Pods: one watch, cached stripped to what selection needs.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(policy::strip_pod)
        .reflect(pod_writer)
        .applied_objects();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let ns_stream = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(strip_namespace)
    .reflect(ns_writer)
    .applied_objects();

    // Records are read only when an image is reconciled, their traces only when merged.
    let (records, record_writer) = reflector::store::<StartupRecord>();
    let record_stream = watcher(
        Api::<StartupRecord>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(learn::strip_trace)
    .reflect(record_writer)
    .applied_objects();

    let ctx = Arc::new(Context {
        client: client.clone(),
        policies: policies.clone(),
        pods: pods.clone(),
        namespaces: namespaces.clone(),
        images: images.clone(),
        records,
        resolver,
        builder,
        limits: context::Limits::new(&settings.build),
        build: settings.build.clone(),
        metrics: metrics.clone(),
        reporter: Reporter {
            controller: "talaria-controller".into(),
            instance: Some(settings.instance.clone()),
        },
        resync: settings.resync,
        problem_retry: settings.resolve_error_ttl.max(Duration::from_millis(200)),
        secret_namespaces: settings.secret_namespaces.clone(),
        artifact_repositories: settings.artifact_repositories.clone(),
    });

    let (p_for_pods, ns_for_pods) = (policies.clone(), namespaces.clone());
    let p_for_ns = policies.clone();
    let shutdown_signal = |rx: watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|v| *v).await;
    };
    let policy_ctrl = pc
        .watches_stream(pod_stream, move |pod: Pod| {
            p_for_pods
                .state()
                .iter()
                .filter(|p| policy::policy_selects_pod(&ns_for_pods, p, &pod))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ns_stream, move |_ns: Namespace| {
            p_for_ns
                .state()
                .iter()
                .filter(|p| p.spec.selector.namespace_selector.is_some())
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches(
            images_api,
            watcher::Config::default(),
            |img: AcceleratedImage| policy::owners(&img),
        )
        .graceful_shutdown_on(shutdown_signal(shutdown.clone()))
        .run(
            policy::reconcile,
            |p: Arc<AccelerationPolicy>, e: &Error, ctx: Arc<Context>| {
                ctx.metrics
                    .reconcile_error("AccelerationPolicy", e.reason());
                warn!(policy = %p.name_any(), error = %e, reason = e.reason(), "policy reconcile failed");
                Action::requeue(Duration::from_secs(5))
            },
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "policy controller");
            }
        });

    let images_for_policies = images.clone();
    let sd = shutdown.clone();
    // Only spec changes of a policy (pause/unpause, credentials) concern its images, not its
    // status writes.
    let policy_specs = watcher(policies_api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let image_ctrl = ic
        .watches_stream(policy_specs, move |p: AccelerationPolicy| {
            let uid = p.uid().unwrap_or_default();
            images_for_policies
                .state()
                .iter()
                .filter(|i| i.owner_references().iter().any(|o| o.uid == uid))
                .map(|i| ObjectRef::from_obj(i.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(record_stream, |r: StartupRecord| {
            Some(ObjectRef::<AcceleratedImage>::new(&r.spec.accelerated_image))
        })
        .graceful_shutdown_on(shutdown_signal(shutdown.clone()))
        .run(
            move |img, ctx| image::reconcile(img, ctx, sd.clone()),
            |img: Arc<AcceleratedImage>, e: &Error, ctx: Arc<Context>| {
                ctx.metrics.reconcile_error("AcceleratedImage", e.reason());
                warn!(image = %img.name_any(), error = %e, reason = e.reason(), "image reconcile failed");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "image controller");
            }
        });

    info!("controllers running");
    futures::join!(policy_ctrl, image_ctrl);
    info!("controllers stopped");
    Ok(())
}
