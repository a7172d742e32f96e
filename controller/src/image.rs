//! The build queue: one reconcile per AcceleratedImage (so builds are de-duplicated by
//! (digest, platform, key) across policies), bounded by global and per-registry limits, with
//! capped exponential backoff per image that survives restarts (`attempts` and
//! `lastAttemptTime` are in the status). An image left in Building by a stopped controller
//! is simply built again: the builder adopts an artifact that was finished, and pushes the
//! manifest last, so an interrupted build never leaves a partial artifact.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use talaria_api::{AcceleratedImage, AcceleratedImageStatus, AccelerationPolicy, Phase};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::context::{ANN_PULL_SECRETS, Ctx, Error, FIELD_MANAGER, condition, truncate};
use crate::policy::{CACHE_SYNC_WAIT, owners};
use crate::registry::BuildRequest;

/// Delay before retry `attempts` + 1 (after `attempts` failures): base * 2^(attempts-1), capped.
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    base.saturating_mul(1u32 << exp).min(max)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Seconds since a timestamp (0 when in the future).
fn age(t: &Time) -> Duration {
    let d = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
    Duration::try_from(d).unwrap_or_default()
}

async fn apply_status(
    ctx: &Ctx,
    img: &AcceleratedImage,
    status: &AcceleratedImageStatus,
) -> Result<(), Error> {
    let api: Api<AcceleratedImage> = Api::all(ctx.client.clone());
    let patch = json!({
        "apiVersion": "talaria.dev/v1alpha1",
        "kind": "AcceleratedImage",
        "status": status,
    });
    api.patch_status(
        &img.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!("writing status of {}", img.name_any())))?;
    Ok(())
}

/// `uid=generation` of each policy, sorted, comma-separated: what a build attempt was made for.
fn owner_generations(policies: &[Arc<AccelerationPolicy>]) -> String {
    let mut v: Vec<String> = policies
        .iter()
        .map(|p| {
            format!(
                "{}={}",
                p.metadata.uid.as_deref().unwrap_or_default(),
                p.metadata.generation.unwrap_or_default()
            )
        })
        .collect();
    v.sort();
    v.join(",")
}

/// The registry host of `registry/repository`.
fn registry_host(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// The image's owning policies as the apiserver has them now; None when one cannot be read.
async fn fresh_owners(ctx: &Ctx, img: &AcceleratedImage) -> Option<Vec<Arc<AccelerationPolicy>>> {
    let api: Api<AccelerationPolicy> = Api::all(ctx.client.clone());
    let mut out = Vec::new();
    for r in owners(img) {
        match api.get_opt(&r.name).await {
            Ok(Some(p)) => out.push(Arc::new(p)),
            Ok(None) => {}
            Err(e) => {
                debug!(policy = %r.name, error = %e, "reading an owning policy; using the cache");
                return None;
            }
        }
    }
    Some(out)
}

#[tracing::instrument(name = "build_image", skip_all, fields(image = %img.name_any()))]
pub async fn reconcile(
    img: Arc<AcceleratedImage>,
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
) -> Result<Action, Error> {
    ctx.metrics.reconcile("AcceleratedImage");
    if img.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    match tokio::time::timeout(CACHE_SYNC_WAIT, ctx.policies.wait_until_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::Other(format!("policy cache stopped: {e}"))),
        Err(_) => return Err(Error::Other("policy cache not synced yet".into())),
    }
    let prev = img.status.clone().unwrap_or_default();
    // The spec changed since the last attempt (its first policy moved the artifact repository):
    // what was built, or failed, was for other settings.
    let settings_changed = prev
        .observed_generation
        .is_some_and(|g| Some(g) != img.metadata.generation);
    if prev.phase == Phase::Ready && prev.artifact.is_some() && !settings_changed {
        return Ok(Action::await_change());
    }
    let mut owner_policies: Vec<Arc<AccelerationPolicy>> = owners(&img)
        .iter()
        .filter_map(|r| ctx.policies.get(r))
        .collect();
    if prev.phase == Phase::Failed {
        // This reconcile may have been triggered by a policy change that the policy cache has
        // not seen yet (the trigger is another watch): read the owners fresh, so a changed
        // policy is not missed and the image left Failed. Failed images are few.
        owner_policies = fresh_owners(&ctx, &img).await.unwrap_or(owner_policies);
    }
    // Paused policies build nothing new; an image nobody active owns waits.
    if owner_policies.is_empty() || owner_policies.iter().all(|p| p.spec.paused) {
        return Ok(Action::await_change());
    }
    let s = &ctx.build;
    let owner_generations = owner_generations(&owner_policies);
    let mut prev = prev;
    if (prev.phase == Phase::Failed && prev.owner_generations.as_ref() != Some(&owner_generations))
        || settings_changed
    {
        // The owners or the image's own settings changed (new credentials, another artifact
        // repository, a new owner...): the failure may be gone, so retry now with a fresh backoff.
        info!(
            attempts = prev.attempts,
            phase = ?prev.phase,
            "owning policies or settings changed; building again"
        );
        prev.attempts = 0;
        prev.last_attempt_time = None;
    }
    if prev.phase == Phase::Failed {
        if prev.attempts >= s.max_attempts {
            return Ok(Action::await_change());
        }
        let wait = backoff(s.backoff_base, s.backoff_max, prev.attempts);
        let waited = prev.last_attempt_time.as_ref().map(age).unwrap_or(wait);
        if waited < wait {
            return Ok(Action::requeue(wait - waited));
        }
    }

    // Queue: wait for a global and a per-registry slot.
    ctx.metrics.queue_depth().inc();
    let reg = ctx.limits.registry(registry_host(&img.spec.image));
    let slots = async {
        let g = ctx.limits.global.acquire().await;
        let r = reg.acquire().await;
        (g, r)
    };
    let (g, r) = slots.await;
    ctx.metrics.queue_depth().dec();
    let (Ok(_g), Ok(_r)) = (g, r) else {
        return Err(Error::Other("build queue closed".into()));
    };
    if *shutdown.borrow() {
        return Ok(Action::await_change());
    }

    let attempts = prev.attempts.saturating_add(1);
    let mut st = AcceleratedImageStatus {
        phase: Phase::Building,
        attempts,
        last_attempt_time: Some(now()),
        observed_generation: img.metadata.generation,
        owner_generations: Some(owner_generations.clone()),
        ..prev.clone()
    };
    st.conditions = vec![condition(
        &prev.conditions,
        "Ready",
        false,
        "Building",
        &format!("build attempt {attempts} running"),
        img.metadata.generation,
    )];
    apply_status(&ctx, &img, &st).await?;
    if prev.phase != Phase::Building {
        ctx.event(
            img.as_ref(),
            false,
            "Building",
            format!(
                "building {}@{} for {}",
                img.spec.image, img.spec.digest, img.spec.platform
            ),
        )
        .await;
    }

    // Credentials: every owner's secrets, and the pull secrets of the pods that run it.
    let mut problems = Vec::new();
    let mut refs: Vec<(String, String)> = owner_policies
        .iter()
        .flat_map(|p| p.spec.registry_credentials.iter())
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    if let Some(ps) = img.annotations().get(ANN_PULL_SECRETS) {
        refs.extend(
            ps.split(',')
                .filter_map(|s| s.split_once('/'))
                .map(|(ns, n)| (ns.to_string(), n.to_string())),
        );
    }
    refs.sort();
    refs.dedup();
    let credentials = ctx.credentials(refs, &mut problems).await;
    for p in &problems {
        warn!(problem = %p, "credentials");
    }
    let req = BuildRequest {
        image: img.spec.image.clone(),
        digest: img.spec.digest.clone(),
        platform: img.spec.platform.clone(),
        profile: img.spec.profile,
        knobs: img.spec.knobs.clone(),
        artifact_repository: img.spec.artifact_repository.clone(),
        credentials,
    };

    ctx.metrics.builds_running().inc();
    let t0 = Instant::now();
    let mut stop = shutdown.clone();
    let outcome = tokio::select! {
        r = tokio::time::timeout(s.timeout, ctx.builder.build(&req)) => Some(r),
        _ = stop.wait_for(|v| *v) => None,
    };
    ctx.metrics.builds_running().dec();
    let secs = t0.elapsed().as_secs_f64();

    let Some(outcome) = outcome else {
        // Shutting down: nothing partial was pushed (the manifest goes last); hand the image
        // back to the queue of whichever controller runs next.
        info!("build abandoned at shutdown");
        st.phase = Phase::Pending;
        st.attempts = prev.attempts;
        st.conditions = vec![condition(
            &prev.conditions,
            "Ready",
            false,
            "Abandoned",
            "build abandoned at controller shutdown; it restarts with the next controller",
            img.metadata.generation,
        )];
        apply_status(&ctx, &img, &st).await?;
        return Ok(Action::await_change());
    };
    let outcome = match outcome {
        Ok(r) => r,
        Err(_) => Err(format!("build timed out after {:?}", s.timeout)),
    };
    match outcome {
        Ok(o) => {
            let result = if o.adopted { "adopted" } else { "built" };
            ctx.metrics.build_finished(result, secs, o.bytes_indexed);
            let msg = format!(
                "artifact {} ({result}) in {}; {} layer(s) indexed",
                o.artifact.digest, o.artifact.repository, o.layers_indexed
            );
            let done = AcceleratedImageStatus {
                phase: Phase::Ready,
                artifact: Some(o.artifact),
                default_artifact: o.default_artifact,
                startup_paths: o.startup_paths,
                startup_bytes: o.startup_bytes,
                layers_indexed: o.layers_indexed,
                layers_skipped: o.layers_skipped,
                build_duration_seconds: Some((secs * 1000.0).round() / 1000.0),
                attempts,
                last_attempt_time: st.last_attempt_time.clone(),
                last_error: None,
                owner_generations: Some(owner_generations),
                conditions: vec![condition(
                    &st.conditions,
                    "Ready",
                    true,
                    if o.adopted { "Adopted" } else { "Built" },
                    &msg,
                    img.metadata.generation,
                )],
                observed_generation: img.metadata.generation,
            };
            apply_status(&ctx, &img, &done).await?;
            info!(%msg, seconds = secs, "image ready");
            ctx.event(img.as_ref(), false, "Ready", msg).await;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.metrics.build_finished("failed", secs, 0);
            let e = truncate(&e, 4096);
            warn!(error = %e, attempt = attempts, "build failed");
            st.phase = Phase::Failed;
            st.last_error = Some(e.clone());
            st.conditions = vec![condition(
                &prev.conditions,
                "Ready",
                false,
                "BuildFailed",
                &e,
                img.metadata.generation,
            )];
            apply_status(&ctx, &img, &st).await?;
            ctx.event(
                img.as_ref(),
                true,
                "BuildFailed",
                format!("attempt {attempts}: {e}"),
            )
            .await;
            if attempts >= s.max_attempts {
                Ok(Action::await_change())
            } else {
                Ok(Action::requeue(backoff(
                    s.backoff_base,
                    s.backoff_max,
                    attempts,
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(10);
        let m = Duration::from_secs(300);
        assert_eq!(backoff(b, m, 1), Duration::from_secs(10));
        assert_eq!(backoff(b, m, 2), Duration::from_secs(20));
        assert_eq!(backoff(b, m, 4), Duration::from_secs(80));
        assert_eq!(backoff(b, m, 30), m);
        assert_eq!(registry_host("127.0.0.1:5000/a/b"), "127.0.0.1:5000");
    }

    #[test]
    fn owner_generations_change_with_a_new_generation_or_owner() {
        let p = |uid: &str, generation: i64| {
            let mut p = AccelerationPolicy::new("p", Default::default());
            p.metadata.uid = Some(uid.into());
            p.metadata.generation = Some(generation);
            Arc::new(p)
        };
        let a = owner_generations(&[p("b", 1), p("a", 2)]);
        assert_eq!(a, "a=2,b=1");
        assert_eq!(a, owner_generations(&[p("a", 2), p("b", 1)]));
        assert_ne!(a, owner_generations(&[p("a", 3), p("b", 1)]));
        assert_ne!(a, owner_generations(&[p("a", 2)]));
    }
}
