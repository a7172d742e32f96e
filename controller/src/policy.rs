//! The policy reconciler: selects image references (pods' and explicit ones), resolves them to
//! per-platform digests, creates or adopts one AcceleratedImage per (digest, platform, key)
//! owned by every selecting policy, and writes the policy's status.

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
use talaria_api::{
    AcceleratedImage, AcceleratedImageSpec, AccelerationPolicy, AccelerationPolicyStatus, Phase,
};
use tracing::{debug, info, warn};

use crate::context::{
    ANN_PULL_SECRETS, ANN_REFERENCE, Ctx, Error, FIELD_MANAGER, LABEL_KEY, condition, truncate,
};
use crate::registry::acceleration_key;
use crate::selector::{NormalizedRef, Pattern, labels_match, normalize};

/// The platform built when a policy names none.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// Longest wait for the caches to fill before a reconcile gives up (and is retried).
pub const CACHE_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
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

fn select(ctx: &Ctx, p: &AccelerationPolicy) -> Selection {
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

struct Desired {
    name: String,
    spec: AcceleratedImageSpec,
    reference: String,
    pull_secrets: BTreeSet<(String, String)>,
}

#[tracing::instrument(name = "reconcile_policy", skip_all, fields(policy = %p.name_any()))]
pub async fn reconcile(p: Arc<AccelerationPolicy>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.reconcile("AccelerationPolicy");
    let name = p.name_any();
    if p.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Selection reads the caches: wait until they hold the cluster's state once. Bounded,
    // because the caches are fed by the controller's triggers, which stop at shutdown.
    let synced = async {
        ctx.pods.wait_until_ready().await?;
        ctx.namespaces.wait_until_ready().await?;
        ctx.images.wait_until_ready().await
    };
    match tokio::time::timeout(CACHE_SYNC_WAIT, synced).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Other(format!("cache stopped: {e}"))),
        Err(_) => return Err(Error::Other("caches not synced yet".into())),
    }
    let Some(oref) = owner_ref(&p) else {
        return Err(Error::Other(format!("policy {name} has no uid yet")));
    };
    let uid = oref.uid.clone();
    let key = acceleration_key(p.spec.profile, &p.spec.knobs);
    let plats = platforms(&p);
    let sel = select(&ctx, &p);
    let mut problems = sel.problems;
    let mut desired: BTreeMap<String, Desired> = BTreeMap::new();

    if !p.spec.paused {
        let refs: Vec<(String, String)> = p
            .spec
            .registry_credentials
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        let policy_creds = ctx.credentials(refs, &mut problems).await;
        // Resolve every selected reference (bounded concurrency, cached by the resolver).
        let mut jobs = Vec::new();
        for (r, secrets) in sel.refs {
            let mut creds = policy_creds.clone();
            let mut secret_problems = Vec::new();
            if !secrets.is_empty() {
                let refs: Vec<(String, String)> = secrets.iter().cloned().collect();
                creds.merge(ctx.credentials(refs, &mut secret_problems).await);
            }
            problems.extend(secret_problems);
            jobs.push((r, secrets, creds));
        }
        let results: Vec<_> = futures::stream::iter(jobs)
            .map(|(r, secrets, creds)| {
                let ctx = ctx.clone();
                let plats = plats.clone();
                async move {
                    let reference = r.fetchable();
                    let res = ctx.resolver.resolve(&reference, &plats, &creds).await;
                    (r, secrets, res)
                }
            })
            .buffer_unordered(RESOLVE_CONCURRENCY)
            .collect()
            .await;
        for (r, secrets, res) in results {
            let reference = r.fetchable();
            match res {
                Err(e) => problems.push(format!("{reference}: {e}")),
                Ok(res) => {
                    for m in &res.missing {
                        problems.push(format!("{reference}: no manifest for platform {m}"));
                    }
                    for f in res.found {
                        let n = image_name(&f.digest, &f.platform, &key);
                        let d = desired.entry(n.clone()).or_insert_with(|| Desired {
                            name: n,
                            spec: AcceleratedImageSpec {
                                image: r.repo(),
                                digest: f.digest.clone(),
                                platform: f.platform.clone(),
                                profile: p.spec.profile,
                                acceleration_key: key.clone(),
                                knobs: p.spec.knobs.clone(),
                                artifact_repository: p.spec.artifact_repository.clone(),
                            },
                            reference: reference.clone(),
                            pull_secrets: BTreeSet::new(),
                        });
                        d.pull_secrets.extend(secrets.iter().cloned());
                    }
                }
            }
        }
        for d in desired.values() {
            if let Err(e) = ensure_owned(&ctx, &p, &oref, d).await {
                problems.push(format!("{}: {e}", d.name));
            }
        }
        remove_stale(&ctx, &p, &uid, &key, &plats).await?;
    }

    let problems_text = problems.join("; ");
    if !problems.is_empty() {
        warn!(policy = %name, problems = %problems_text, "policy has problems");
    }
    write_status(&ctx, &p, &uid, &desired, &problems).await?;
    debug!(policy = %name, images = desired.len(), "policy reconciled");
    // Problems (unresolvable references, unreadable secrets) are retried sooner than the resync.
    Ok(Action::requeue(if problems.is_empty() {
        ctx.resync
    } else {
        ctx.problem_retry.min(ctx.resync)
    }))
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
    ctx: &Ctx,
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
    ctx: &Ctx,
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
            return Err(Error::Other(format!(
                "AcceleratedImage {} vanished; retrying",
                d.name
            )));
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
    Err(Error::Other(format!(
        "AcceleratedImage {}: owners kept changing; retrying later",
        d.name
    )))
}

/// Drops the policy from images it no longer selects by key or platform (a knob or platform
/// change); an image left without owners is deleted (GC only deletes on owner deletion).
async fn remove_stale(
    ctx: &Ctx,
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

async fn write_status(
    ctx: &Ctx,
    p: &AccelerationPolicy,
    uid: &str,
    desired: &BTreeMap<String, Desired>,
    problems: &[String],
) -> Result<(), Error> {
    let mut phases: BTreeMap<String, Phase> = BTreeMap::new();
    for img in ctx.images.state() {
        if img.owner_references().iter().any(|o| o.uid == uid) {
            phases.insert(
                img.name_any(),
                img.status.as_ref().map(|s| s.phase).unwrap_or_default(),
            );
        }
    }
    for n in desired.keys() {
        phases.entry(n.clone()).or_insert(Phase::Pending);
    }
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
    let failed_names: Vec<&String> = phases
        .iter()
        .filter(|(_, ph)| **ph == Phase::Failed)
        .map(|(n, _)| n)
        .take(10)
        .collect();
    let degraded_msg = {
        let mut parts: Vec<String> = problems.to_vec();
        if failed > 0 {
            parts.push(format!(
                "{failed} image(s) failed to build: {}",
                failed_names
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
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
    let conds = vec![
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
            if problems.is_empty() {
                if degraded {
                    "BuildFailed"
                } else {
                    "AsExpected"
                }
            } else {
                "SelectionFailed"
            },
            if degraded {
                &degraded_msg
            } else {
                "no problems"
            },
            generation,
        ),
    ];
    let status = AccelerationPolicyStatus {
        conditions: conds,
        observed_generation: generation,
        images: total,
        ready,
        building,
        failed,
    };
    if p.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let was_degraded = prev
        .conditions
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True" && c.message == degraded_msg);
    if degraded && !was_degraded {
        ctx.event(p, true, "Degraded", degraded_msg.clone()).await;
    }
    let was_ready = prev
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if all_ready && !was_ready {
        ctx.event(p, false, "Ready", ready_msg.clone()).await;
    }
    let api: Api<AccelerationPolicy> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AccelerationPolicy",
        "status": status,
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
}
