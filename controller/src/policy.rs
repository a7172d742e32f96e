//! The policy reconciler: selects image references (pods' and explicit ones), resolves them to
//! per-platform digests, creates or adopts one AcceleratedImage per (digest, platform, key)
//! owned by every selecting policy, and writes the policy's status.
//!
//! A reconcile is a pipeline: `select` → `resolve_selected` → `desired` → apply
//! (`ensure_owned`, `remove_stale`) → `compute_status` → one status write. The desired images
//! and the status are pure functions, tested below; the apiserver tests cover the wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::time::Duration;

use talaria_api::{
    AcceleratedImage, AcceleratedImageSpec, AccelerationPolicy, AccelerationPolicyStatus, Phase,
};
use tracing::{debug, info, warn};

use crate::builder::acceleration_key;
use crate::context::{
    ANN_PULL_SECRETS, ANN_REFERENCE, Context, Error, FIELD_MANAGER, LABEL_KEY, Notice, condition,
    truncate,
};
use crate::resolve::{Resolution, ResolverError};
use crate::selector::{NormalizedRef, Pattern, labels_match, normalize};

/// The platform built when a policy names none.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// Longest wait for the caches to fill before a reconcile gives up (and is retried).
pub const CACHE_SYNC_WAIT: Duration = Duration::from_secs(10);
/// References resolved at once in one reconcile.
const RESOLVE_CONCURRENCY: usize = 16;

/// The AcceleratedImage name of (digest, platform, key): stable, so every policy and every
/// controller replica converges on one object.
pub fn image_name(digest: &str, platform: &str, key: &str) -> String {
    let h = Sha256::digest(format!("{digest}\n{platform}\n{key}").as_bytes());
    format!("ai-{}", &hex::encode(h)[..40])
}

/// The platforms a policy builds.
pub fn platforms(p: &AccelerationPolicy) -> Vec<String> {
    if p.spec.platforms.is_empty() {
        vec![DEFAULT_PLATFORM.to_string()]
    } else {
        p.spec.platforms.clone()
    }
}

/// Every image reference of a pod: init, regular and ephemeral containers.
pub fn pod_images(pod: &Pod) -> impl Iterator<Item = &str> {
    let spec = pod.spec.as_ref();
    let init = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.image.as_deref());
    let regular = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.image.as_deref());
    let eph = spec
        .and_then(|s| s.ephemeral_containers.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.image.as_deref());
    init.chain(regular).chain(eph)
}

/// Drops everything of a pod but what selection needs (name, namespace, labels, images,
/// pull secrets), so the pod cache stays small.
pub fn strip_pod(pod: &mut Pod) {
    let m = &mut pod.metadata;
    m.annotations = None;
    m.managed_fields = None;
    m.owner_references = None;
    m.finalizers = None;
    pod.status = None;
    if let Some(spec) = pod.spec.as_mut() {
        let keep = |c: &mut k8s_openapi::api::core::v1::Container| {
            *c = k8s_openapi::api::core::v1::Container {
                name: std::mem::take(&mut c.name),
                image: c.image.take(),
                ..Default::default()
            };
        };
        spec.containers.iter_mut().for_each(keep);
        spec.init_containers.iter_mut().flatten().for_each(keep);
        for c in spec.ephemeral_containers.iter_mut().flatten() {
            *c = k8s_openapi::api::core::v1::EphemeralContainer {
                name: std::mem::take(&mut c.name),
                image: c.image.take(),
                ..Default::default()
            };
        }
        *spec = k8s_openapi::api::core::v1::PodSpec {
            containers: std::mem::take(&mut spec.containers),
            init_containers: spec.init_containers.take(),
            ephemeral_containers: spec.ephemeral_containers.take(),
            image_pull_secrets: spec.image_pull_secrets.take(),
            ..Default::default()
        };
    }
}

/// Whether a pod is in scope of a policy's namespace and pod selectors.
fn pod_in_scope(namespaces: &Store<Namespace>, p: &AccelerationPolicy, pod: &Pod) -> bool {
    let sel = &p.spec.selector;
    if let Some(ps) = &sel.pod_selector
        && !labels_match(ps, pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
    {
        return false;
    }
    if let Some(ns_sel) = &sel.namespace_selector {
        let ns = pod.namespace().unwrap_or_default();
        let labels = namespaces
            .get(&ObjectRef::new(&ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        if !labels_match(ns_sel, &labels) {
            return false;
        }
    }
    true
}

/// Whether a pod has an image a policy's patterns match (and is in its scope).
pub fn policy_selects_pod(
    namespaces: &Store<Namespace>,
    p: &AccelerationPolicy,
    pod: &Pod,
) -> bool {
    if p.spec.selector.images.is_empty() {
        return false;
    }
    let patterns: Vec<Pattern> = p
        .spec
        .selector
        .images
        .iter()
        .map(|s| Pattern::parse(s))
        .collect();
    pod_images(pod)
        .filter_map(normalize)
        .any(|r| patterns.iter().any(|pat| pat.matches(&r)))
        && pod_in_scope(namespaces, p, pod)
}

/// What a policy selects: references with the pull secrets of the pods that use them.
#[derive(Default)]
struct Selection {
    refs: BTreeMap<NormalizedRef, BTreeSet<(String, String)>>,
    problems: Vec<String>,
}

fn select(ctx: &Context, p: &AccelerationPolicy) -> Selection {
    let mut out = Selection::default();
    for s in &p.spec.images {
        match normalize(s) {
            Some(r) => {
                out.refs.entry(r).or_default();
            }
            None => out
                .problems
                .push(format!("{s:?} is not a valid image reference")),
        }
    }
    if p.spec.selector.images.is_empty() {
        return out;
    }
    let patterns: Vec<Pattern> = p
        .spec
        .selector
        .images
        .iter()
        .map(|s| Pattern::parse(s))
        .collect();
    for pod in ctx.pods.state() {
        let matched: Vec<NormalizedRef> = pod_images(&pod)
            .filter_map(normalize)
            .filter(|r| patterns.iter().any(|pat| pat.matches(r)))
            .collect();
        if matched.is_empty() || !pod_in_scope(&ctx.namespaces, p, &pod) {
            continue;
        }
        let ns = pod.namespace().unwrap_or_default();
        let secrets: Vec<(String, String)> = pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.as_ref())
            .into_iter()
            .flatten()
            .filter(|s| !s.name.is_empty())
            .map(|s| (ns.clone(), s.name.clone()))
            .collect();
        for r in matched {
            out.refs
                .entry(r)
                .or_default()
                .extend(secrets.iter().cloned());
        }
    }
    out
}

fn owner_ref(p: &AccelerationPolicy) -> Option<OwnerReference> {
    // Not a controller reference: several policies own one image, and GC deletes it with
    // the last of them.
    let mut o = p.controller_owner_ref(&())?;
    o.controller = None;
    o.block_owner_deletion = None;
    Some(o)
}

/// One AcceleratedImage the policy wants.
#[derive(Debug, PartialEq)]
struct Desired {
    name: String,
    spec: AcceleratedImageSpec,
    reference: String,
    pull_secrets: BTreeSet<(String, String)>,
}

/// A selected reference, the pull secrets of the pods that use it, and what it resolved to.
struct Lookup {
    reference: NormalizedRef,
    secrets: BTreeSet<(String, String)>,
    result: Result<Resolution, ResolverError>,
}

/// Resolves every selected reference with the policy's credentials and its pods' pull secrets
/// (bounded concurrency; the resolver caches). Unreadable secrets are added to `problems`.
async fn resolve_selected(
    ctx: &Arc<Context>,
    p: &AccelerationPolicy,
    refs: BTreeMap<NormalizedRef, BTreeSet<(String, String)>>,
    plats: &[String],
    problems: &mut Vec<String>,
) -> Vec<Lookup> {
    let policy_refs = ctx.secret_namespaces.filter(
        p.spec
            .registry_credentials
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone())),
        problems,
    );
    let policy_creds = ctx.credentials(policy_refs, problems).await;
    let mut jobs = Vec::new();
    for (r, secrets) in refs {
        let mut creds = policy_creds.clone();
        if !secrets.is_empty() {
            let refs: Vec<(String, String)> = secrets.iter().cloned().collect();
            creds.merge(ctx.credentials(refs, problems).await);
        }
        jobs.push((r, secrets, creds));
    }
    futures::stream::iter(jobs)
        .map(|(reference, secrets, creds)| {
            let ctx = ctx.clone();
            async move {
                let result = ctx
                    .resolver
                    .resolve(&reference.fetchable(), plats, &creds)
                    .await;
                Lookup {
                    reference,
                    secrets,
                    result,
                }
            }
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await
}

/// The images the policy wants (by name) from what its references resolved to, and the
/// problems found on the way (unresolvable references, missing platforms). Images several
/// references resolve to are wanted once, with the pull secrets of all of them.
fn desired(
    p: &AccelerationPolicy,
    key: &str,
    lookups: Vec<Lookup>,
) -> (BTreeMap<String, Desired>, Vec<String>) {
    let mut out: BTreeMap<String, Desired> = BTreeMap::new();
    let mut problems = Vec::new();
    for Lookup {
        reference: r,
        secrets,
        result,
    } in lookups
    {
        let reference = r.fetchable();
        let res = match result {
            Ok(res) => res,
            Err(e) => {
                problems.push(format!("{reference}: {e}"));
                continue;
            }
        };
        for m in &res.missing {
            problems.push(format!("{reference}: no manifest for platform {m}"));
        }
        for f in res.found {
            let n = image_name(&f.digest, &f.platform, key);
            let d = out.entry(n.clone()).or_insert_with(|| Desired {
                name: n,
                spec: AcceleratedImageSpec {
                    image: r.repo(),
                    digest: f.digest.clone(),
                    platform: f.platform.clone(),
                    profile: p.spec.profile,
                    acceleration_key: key.to_string(),
                    knobs: p.spec.knobs.clone(),
                    artifact_repository: p.spec.artifact_repository.clone(),
                },
                // As named (with its tag), for `kubectl get accimg`.
                reference: r.named(),
                pull_secrets: BTreeSet::new(),
            });
            d.pull_secrets.extend(secrets.iter().cloned());
        }
    }
    (out, problems)
}

/// How soon to reconcile again: problems (unresolvable references, unreadable secrets) are
/// retried sooner than the resync.
fn requeue_after(has_problems: bool, resync: Duration, problem_retry: Duration) -> Duration {
    if has_problems {
        problem_retry.min(resync)
    } else {
        resync
    }
}

#[tracing::instrument(name = "reconcile_policy", skip_all, fields(policy = %p.name_any()))]
pub async fn reconcile(p: Arc<AccelerationPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile("AccelerationPolicy");
    let name = p.name_any();
    if p.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Selection reads the caches: wait until they hold the cluster's state once. Bounded,
    // because the caches are fed by the controller's triggers, which stop at shutdown.
    let synced = async {
        ctx.pods
            .wait_until_ready()
            .await
            .map_err(|source| Error::CacheStopped {
                cache: "pod",
                source,
            })?;
        ctx.namespaces
            .wait_until_ready()
            .await
            .map_err(|source| Error::CacheStopped {
                cache: "namespace",
                source,
            })?;
        ctx.images
            .wait_until_ready()
            .await
            .map_err(|source| Error::CacheStopped {
                cache: "AcceleratedImage",
                source,
            })
    };
    match tokio::time::timeout(CACHE_SYNC_WAIT, synced).await {
        Ok(r) => r?,
        Err(_) => return Err(Error::CacheNotSynced("pod, namespace or AcceleratedImage")),
    }
    let oref = owner_ref(&p).ok_or_else(|| Error::NoUid(name.clone()))?;
    let uid = oref.uid.clone();
    let key = acceleration_key(p.spec.profile, &p.spec.knobs);
    let plats = platforms(&p);

    let sel = select(&ctx, &p);
    let mut problems = sel.problems;
    let mut wanted = BTreeMap::new();
    // A paused policy keeps its images as they are, and still reports on them.
    if !p.spec.paused {
        let lookups = resolve_selected(&ctx, &p, sel.refs, &plats, &mut problems).await;
        let (d, resolution_problems) = desired(&p, &key, lookups);
        problems.extend(resolution_problems);
        wanted = d;
        for d in wanted.values() {
            if let Err(e) = ensure_owned(&ctx, &p, &oref, d).await {
                problems.push(format!("{}: {e}", d.name));
            }
        }
        remove_stale(&ctx, &p, &uid, &key, &plats).await?;
    }

    if !problems.is_empty() {
        warn!(policy = %name, problems = %problems.join("; "), "policy has problems");
    }
    let phases = image_phases(&ctx.images.state(), &uid, &wanted);
    write_status(&ctx, &p, compute_status(&p, &phases, &problems)).await?;
    debug!(policy = %name, images = wanted.len(), "policy reconciled");
    Ok(Action::requeue(requeue_after(
        !problems.is_empty(),
        ctx.resync,
        ctx.problem_retry,
    )))
}

fn new_image(oref: &OwnerReference, d: &Desired) -> AcceleratedImage {
    let mut ann = BTreeMap::new();
    ann.insert(ANN_REFERENCE.to_string(), truncate(&d.reference, 1024));
    if let Some(s) = pull_secrets_annotation(d) {
        ann.insert(ANN_PULL_SECRETS.to_string(), s);
    }
    let mut labels = BTreeMap::new();
    labels.insert(
        LABEL_KEY.to_string(),
        truncate(&d.spec.acceleration_key, 63),
    );
    AcceleratedImage {
        metadata: ObjectMeta {
            name: Some(d.name.clone()),
            annotations: Some(ann),
            labels: Some(labels),
            owner_references: Some(vec![oref.clone()]),
            ..Default::default()
        },
        spec: d.spec.clone(),
        status: None,
    }
}

/// The pull-secrets annotation as `new_image` writes it.
fn pull_secrets_annotation(d: &Desired) -> Option<String> {
    if d.pull_secrets.is_empty() {
        return None;
    }
    let s: Vec<String> = d
        .pull_secrets
        .iter()
        .take(32)
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect();
    Some(s.join(","))
}

/// Keeps an existing image's per-policy settings (artifact repository, pull secrets) in step
/// with its first owner, so a policy edited after a failure retries with its new settings
/// instead of the ones the image was created with. Other owners never override the first.
async fn refresh_settings(
    ctx: &Context,
    oref: &OwnerReference,
    d: &Desired,
    img: &AcceleratedImage,
) -> Result<(), Error> {
    if img.owner_references().first().map(|o| &o.uid) != Some(&oref.uid) {
        return Ok(());
    }
    let want_secrets = pull_secrets_annotation(d);
    let have_secrets = img.annotations().get(ANN_PULL_SECRETS).cloned();
    if img.spec.artifact_repository == d.spec.artifact_repository && have_secrets == want_secrets {
        return Ok(());
    }
    let api: Api<AcceleratedImage> = Api::all(ctx.client.clone());
    let patch = json!({
        "metadata": {
            "resourceVersion": img.resource_version(),
            "annotations": { ANN_PULL_SECRETS: want_secrets },
        },
        "spec": { "artifactRepository": d.spec.artifact_repository },
    });
    match api
        .patch(&d.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(image = %d.name, "AcceleratedImage settings follow its policy");
            Ok(())
        }
        // Someone else wrote it since our cache saw it; the next reconcile looks again.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("updating settings of {}", d.name))(e)),
    }
}

/// Creates the image owned by the policy, or adds the policy to the owners of an existing one.
async fn ensure_owned(
    ctx: &Context,
    p: &AccelerationPolicy,
    oref: &OwnerReference,
    d: &Desired,
) -> Result<(), Error> {
    let api: Api<AcceleratedImage> = Api::all(ctx.client.clone());
    let cached = ctx.images.get(&ObjectRef::new(&d.name));
    if let Some(img) = cached.as_ref()
        && img.owner_references().iter().any(|o| o.uid == oref.uid)
    {
        return refresh_settings(ctx, oref, d, img).await;
    }
    if cached.is_none() {
        match api
            .create(&PostParams::default(), &new_image(oref, d))
            .await
        {
            Ok(_) => {
                info!(image = %d.name, reference = %d.reference, platform = %d.spec.platform, "AcceleratedImage created");
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::kube(format!("creating AcceleratedImage {}", d.name))(e)),
        }
    }
    // Adopt: add this policy to the owners, guarded by resourceVersion against lost updates.
    for _ in 0..5 {
        let Some(cur) = api
            .get_opt(&d.name)
            .await
            .map_err(Error::kube(format!("reading AcceleratedImage {}", d.name)))?
        else {
            return Err(Error::Vanished(d.name.clone()));
        };
        let mut owners = cur.owner_references().to_vec();
        if owners.iter().any(|o| o.uid == oref.uid) {
            return Ok(());
        }
        owners.push(oref.clone());
        let patch = json!({"metadata": {
            "resourceVersion": cur.resource_version(),
            "ownerReferences": owners,
        }});
        match api
            .patch(&d.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(image = %d.name, policy = %p.name_any(), "AcceleratedImage adopted");
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                return Err(Error::kube(format!("adding an owner to {}", d.name))(e));
            }
        }
    }
    Err(Error::OwnersChanging(d.name.clone()))
}

/// Drops the policy from images it no longer selects by key or platform (a knob or platform
/// change); an image left without owners is deleted (GC only deletes on owner deletion).
async fn remove_stale(
    ctx: &Context,
    p: &AccelerationPolicy,
    uid: &str,
    key: &str,
    plats: &[String],
) -> Result<(), Error> {
    let api: Api<AcceleratedImage> = Api::all(ctx.client.clone());
    let stale: Vec<_> = ctx
        .images
        .state()
        .into_iter()
        .filter(|i| i.owner_references().iter().any(|o| o.uid == uid))
        .filter(|i| i.spec.acceleration_key != key || !plats.contains(&i.spec.platform))
        .collect();
    for img in stale {
        let name = img.name_any();
        let owners: Vec<_> = img
            .owner_references()
            .iter()
            .filter(|o| o.uid != uid)
            .cloned()
            .collect();
        let r = if owners.is_empty() {
            api.delete(&name, &Default::default()).await.map(|_| ())
        } else {
            let patch = json!({"metadata": {
                "resourceVersion": img.resource_version(),
                "ownerReferences": owners,
            }});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        };
        match r {
            Ok(()) => {
                info!(image = %name, policy = %p.name_any(), "policy no longer selects image")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("releasing AcceleratedImage {name}"))(e)),
        }
    }
    Ok(())
}

/// The phase of every image the policy owns (by the cache) or wants (Pending until the cache
/// has it).
fn image_phases(
    images: &[Arc<AcceleratedImage>],
    uid: &str,
    wanted: &BTreeMap<String, Desired>,
) -> BTreeMap<String, Phase> {
    let mut phases: BTreeMap<String, Phase> = images
        .iter()
        .filter(|img| img.owner_references().iter().any(|o| o.uid == uid))
        .map(|img| {
            let phase = img.status.as_ref().map(|s| s.phase).unwrap_or_default();
            (img.name_any(), phase)
        })
        .collect();
    for n in wanted.keys() {
        phases.entry(n.clone()).or_insert(Phase::Pending);
    }
    phases
}

/// A policy status to write and the events that announce what changed in it.
#[derive(Debug, PartialEq)]
struct StatusUpdate {
    status: AccelerationPolicyStatus,
    notices: Vec<Notice>,
}

/// The policy's status from its images' phases and the problems of this reconcile.
fn compute_status(
    p: &AccelerationPolicy,
    phases: &BTreeMap<String, Phase>,
    problems: &[String],
) -> StatusUpdate {
    let count = |ph: Phase| phases.values().filter(|&&x| x == ph).count() as u32;
    let (ready, failed, building) = (
        count(Phase::Ready),
        count(Phase::Failed),
        count(Phase::Building),
    );
    let total = phases.len() as u32;
    let pending = total - ready - failed - building;
    let generation = p.metadata.generation;
    let prev = p.status.clone().unwrap_or_default();
    let paused = p.spec.paused;
    let failed_names: Vec<&str> = phases
        .iter()
        .filter(|(_, ph)| **ph == Phase::Failed)
        .map(|(n, _)| n.as_str())
        .take(10)
        .collect();
    let degraded_msg = {
        let mut parts: Vec<String> = problems.to_vec();
        if failed > 0 {
            parts.push(format!(
                "{failed} image(s) failed to build: {}",
                failed_names.join(", ")
            ));
        }
        parts.join("; ")
    };
    let degraded = !degraded_msg.is_empty();
    let progressing = !paused && (pending + building) > 0;
    let all_ready = total > 0 && ready == total && !degraded;
    let (ready_reason, ready_msg) = if paused {
        ("Paused", "the policy is paused".to_string())
    } else if all_ready {
        ("AllReady", format!("{ready} image(s) ready"))
    } else if total == 0 {
        ("NoImages", "no image selected yet".to_string())
    } else if progressing {
        ("Building", format!("{ready} of {total} image(s) ready"))
    } else {
        ("Degraded", format!("{ready} of {total} image(s) ready"))
    };
    let degraded_reason = match (problems.is_empty(), degraded) {
        (false, _) => "SelectionFailed",
        (true, true) => "BuildFailed",
        (true, false) => "AsExpected",
    };
    let conditions = vec![
        condition(
            &prev.conditions,
            "Ready",
            all_ready,
            ready_reason,
            &ready_msg,
            generation,
        ),
        condition(
            &prev.conditions,
            "Progressing",
            progressing,
            if progressing { "Building" } else { "Idle" },
            &format!("{pending} pending, {building} building"),
            generation,
        ),
        condition(
            &prev.conditions,
            "Degraded",
            degraded,
            degraded_reason,
            if degraded {
                &degraded_msg
            } else {
                "no problems"
            },
            generation,
        ),
    ];
    // Events for news only: a new problem, or becoming ready.
    let mut notices = Vec::new();
    let was_degraded = prev
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True" && c.message == degraded_msg);
    if degraded && !was_degraded {
        notices.push(Notice::warning("Degraded", degraded_msg));
    }
    let was_ready = prev
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if all_ready && !was_ready {
        notices.push(Notice::normal("Ready", ready_msg));
    }
    StatusUpdate {
        status: AccelerationPolicyStatus {
            conditions,
            observed_generation: generation,
            images: total,
            ready,
            building,
            failed,
        },
        notices,
    }
}

/// Publishes the update's events and writes its status, unless the status is unchanged (an
/// unchanged status is no news, and writing it would trigger another reconcile).
async fn write_status(
    ctx: &Context,
    p: &AccelerationPolicy,
    update: StatusUpdate,
) -> Result<(), Error> {
    if p.status.as_ref() == Some(&update.status) {
        return Ok(());
    }
    for n in update.notices {
        ctx.event(p, n).await;
    }
    let api: Api<AccelerationPolicy> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "status": update.status,
    });
    api.patch_status(
        &p.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!(
        "writing status of policy {}",
        p.name_any()
    )))?;
    Ok(())
}

/// Policies that own an image (for mapping image events to policy reconciles).
pub fn owners(img: &AcceleratedImage) -> Vec<ObjectRef<AccelerationPolicy>> {
    img.owner_references()
        .iter()
        .filter(|o| {
            o.kind == AccelerationPolicy::kind(&()) && o.api_version.starts_with("talaria.dev/")
        })
        .map(|o| ObjectRef::new(&o.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::PlatformManifest;

    #[test]
    fn names_are_stable_and_valid() {
        let d = format!("sha256:{}", "a".repeat(64));
        let a = image_name(&d, "linux/amd64", "k");
        assert_eq!(a, image_name(&d, "linux/amd64", "k"));
        assert_ne!(a, image_name(&d, "linux/arm64", "k"));
        assert_ne!(a, image_name(&d, "linux/amd64", "k2"));
        assert!(
            a.len() <= 63
                && a.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }

    #[test]
    fn pod_images_cover_all_container_kinds_and_strip_keeps_them() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"big": "x"}},
            "spec": {
                "initContainers": [{"name": "i", "image": "init:1", "command": ["x"]}],
                "containers": [{"name": "c", "image": "app:1", "env": [{"name": "A", "value": "b"}]}],
                "ephemeralContainers": [{"name": "e", "image": "debug:1"}],
                "imagePullSecrets": [{"name": "s"}],
                "nodeName": "n1"
            },
            "status": {"phase": "Running"}
        }))
        .unwrap();
        strip_pod(&mut pod);
        let imgs: Vec<&str> = pod_images(&pod).collect();
        assert_eq!(imgs, ["init:1", "app:1", "debug:1"]);
        assert!(pod.status.is_none() && pod.metadata.annotations.is_none());
        let spec = pod.spec.as_ref().unwrap();
        assert!(spec.node_name.is_none() && spec.containers[0].env.is_none());
        assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "s");
    }

    fn policy(paused: bool) -> AccelerationPolicy {
        let mut p = AccelerationPolicy::new("p", Default::default());
        p.metadata.generation = Some(4);
        p.spec.paused = paused;
        p
    }

    fn phases(v: &[(&str, Phase)]) -> BTreeMap<String, Phase> {
        v.iter().map(|(n, ph)| (n.to_string(), *ph)).collect()
    }

    /// (status, reason) of a condition.
    fn cond<'a>(u: &'a StatusUpdate, type_: &str) -> (&'a str, &'a str) {
        let c = u
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    fn message<'a>(u: &'a StatusUpdate, type_: &str) -> &'a str {
        let c = u.status.conditions.iter().find(|c| c.type_ == type_);
        c.map(|c| c.message.as_str()).unwrap_or_default()
    }

    #[test]
    fn a_policy_without_images_says_so() {
        let u = compute_status(&policy(false), &BTreeMap::new(), &[]);
        assert_eq!(cond(&u, "Ready"), ("False", "NoImages"));
        assert_eq!(cond(&u, "Progressing"), ("False", "Idle"));
        assert_eq!(cond(&u, "Degraded"), ("False", "AsExpected"));
        assert_eq!(u.status.observed_generation, Some(4));
        assert!(u.notices.is_empty());
    }

    #[test]
    fn a_policy_is_ready_when_all_its_images_are_and_says_it_once() {
        let mut p = policy(false);
        let all = phases(&[("a", Phase::Ready), ("b", Phase::Ready)]);
        let u = compute_status(&p, &all, &[]);
        assert_eq!(cond(&u, "Ready"), ("True", "AllReady"));
        assert_eq!((u.status.images, u.status.ready), (2, 2));
        assert_eq!(
            u.notices,
            [Notice::normal("Ready", "2 image(s) ready".into())]
        );
        p.status = Some(u.status);
        let again = compute_status(&p, &all, &[]);
        assert!(again.notices.is_empty(), "{:?}", again.notices);
        assert_eq!(
            Some(&again.status),
            p.status.as_ref(),
            "unchanged: no write"
        );
    }

    #[test]
    fn pending_and_building_images_are_progress() {
        let ph = phases(&[
            ("a", Phase::Ready),
            ("b", Phase::Pending),
            ("c", Phase::Building),
        ]);
        let u = compute_status(&policy(false), &ph, &[]);
        assert_eq!(cond(&u, "Ready"), ("False", "Building"));
        assert_eq!(cond(&u, "Progressing"), ("True", "Building"));
        assert_eq!(message(&u, "Progressing"), "1 pending, 1 building");
        assert_eq!(message(&u, "Ready"), "1 of 3 image(s) ready");
        assert_eq!(u.status.building, 1);
        // Paused: nothing progresses, whatever the phases.
        let u = compute_status(&policy(true), &ph, &[]);
        assert_eq!(cond(&u, "Ready"), ("False", "Paused"));
        assert_eq!(cond(&u, "Progressing"), ("False", "Idle"));
    }

    #[test]
    fn failed_builds_degrade_the_policy_and_are_named() {
        let mut p = policy(false);
        let ph = phases(&[("a", Phase::Ready), ("b", Phase::Failed)]);
        let u = compute_status(&p, &ph, &[]);
        assert_eq!(cond(&u, "Ready"), ("False", "Degraded"));
        assert_eq!(cond(&u, "Degraded"), ("True", "BuildFailed"));
        assert_eq!(message(&u, "Degraded"), "1 image(s) failed to build: b");
        assert_eq!(u.status.failed, 1);
        assert_eq!(u.notices.len(), 1);
        assert!(u.notices[0].warning && u.notices[0].reason == "Degraded");
        // The same problem again is no news.
        p.status = Some(u.status);
        assert!(compute_status(&p, &ph, &[]).notices.is_empty());
    }

    #[test]
    fn selection_problems_come_first_and_block_ready() {
        let ph = phases(&[("a", Phase::Ready)]);
        let problems = ["r.io/x:1: not found".to_string()];
        let u = compute_status(&policy(false), &ph, &problems);
        assert_eq!(cond(&u, "Degraded"), ("True", "SelectionFailed"));
        assert_eq!(message(&u, "Degraded"), "r.io/x:1: not found");
        assert_eq!(cond(&u, "Ready").0, "False");
    }

    fn lookup(
        reference: &str,
        secret: Option<&str>,
        result: Result<Resolution, ResolverError>,
    ) -> Lookup {
        Lookup {
            reference: normalize(reference).expect("reference"),
            secrets: secret
                .map(|s| ("ns".to_string(), s.to_string()))
                .into_iter()
                .collect(),
            result,
        }
    }

    fn found(platform: &str, digest: &str) -> PlatformManifest {
        PlatformManifest {
            platform: platform.into(),
            digest: digest.into(),
        }
    }

    #[test]
    fn references_to_one_manifest_want_one_image_with_all_their_secrets() {
        let mut p = policy(false);
        p.spec.artifact_repository = Some("r.io/artifacts".into());
        let both = Resolution {
            found: vec![found("linux/amd64", "sha256:m")],
            missing: vec!["linux/arm64".into()],
        };
        let lookups = vec![
            lookup("r.io/app:1", Some("one"), Ok(both.clone())),
            lookup("r.io/app:latest", Some("two"), Ok(both)),
            lookup(
                "r.io/gone:1",
                None,
                Err(ResolverError::NoPlatform("linux/amd64".into())),
            ),
        ];
        let (want, problems) = desired(&p, "k", lookups);
        assert_eq!(want.len(), 1);
        let d = want.values().next().expect("one image");
        assert_eq!(d.name, image_name("sha256:m", "linux/amd64", "k"));
        assert_eq!(d.reference, "r.io/app:1", "named after the first reference");
        assert_eq!(d.spec.image, "r.io/app");
        assert_eq!(d.spec.acceleration_key, "k");
        assert_eq!(
            d.spec.artifact_repository.as_deref(),
            Some("r.io/artifacts")
        );
        let secrets: Vec<&str> = d.pull_secrets.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(secrets, ["one", "two"]);
        assert_eq!(
            problems,
            [
                "r.io/app:1: no manifest for platform linux/arm64",
                "r.io/app:latest: no manifest for platform linux/arm64",
                "r.io/gone:1: no manifest for platform(s) linux/amd64",
            ]
        );
    }

    #[test]
    fn owned_and_wanted_images_make_the_phases() {
        let mut owned = AcceleratedImage::new("a", Default::default());
        owned.metadata.owner_references = Some(vec![OwnerReference {
            uid: "u1".into(),
            ..Default::default()
        }]);
        owned.status = Some(talaria_api::AcceleratedImageStatus {
            phase: Phase::Ready,
            ..Default::default()
        });
        let mut other = owned.clone();
        other.metadata.name = Some("b".into());
        other.metadata.owner_references.as_mut().expect("owners")[0].uid = "u2".into();
        let mut wanted = BTreeMap::new();
        for n in ["a", "c"] {
            wanted.insert(
                n.to_string(),
                Desired {
                    name: n.into(),
                    spec: Default::default(),
                    reference: String::new(),
                    pull_secrets: BTreeSet::new(),
                },
            );
        }
        let ph = image_phases(&[Arc::new(owned), Arc::new(other)], "u1", &wanted);
        assert_eq!(ph, phases(&[("a", Phase::Ready), ("c", Phase::Pending)]));
    }

    #[test]
    fn problems_are_retried_before_the_resync() {
        let (resync, retry) = (Duration::from_secs(300), Duration::from_secs(30));
        assert_eq!(requeue_after(false, resync, retry), resync);
        assert_eq!(requeue_after(true, resync, retry), retry);
        assert_eq!(
            requeue_after(true, retry, resync),
            retry,
            "never later than the resync"
        );
    }
}
