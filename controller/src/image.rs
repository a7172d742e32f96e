//! The build queue: one reconcile per AcceleratedImage (so builds are de-duplicated by
//! (digest, platform, key) across policies), bounded by global and per-registry limits, with
//! capped exponential backoff per image that survives restarts (`attempts` and
//! `lastAttemptTime` are in the status). A controller that stops gracefully hands its builds
//! back (Pending, not counted). An image found in Building was interrupted (the controller
//! was killed, ran out of memory, or lost its lease during the build): that counts as a failed
//! attempt, so backoff and `maxAttempts` apply and a build that kills the controller cannot
//! crash-loop every new leader. The builder pushes the manifest last, so an interrupted
//! build never leaves a partial artifact.
//!
//! A reconcile is a pipeline: read the owners → [`decide`] → wait for a slot → write the
//! [`building_status`] → build → write the [`compute_status`] of the result. The decisions are
//! pure functions, tested below; the apiserver tests (`tests/reconcile.rs`) cover the wiring.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use talaria_api::{
    AcceleratedImage, AcceleratedImageStatus, AccelerationPolicy, Phase, PlanSource, Profile,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::builder::{BuildOutcome, BuildRequest, BuilderError, RecordedInput};
use crate::context::{
    ANN_PULL_SECRETS, ANN_REFERENCE, BuildSettings, Context, Error, FIELD_MANAGER, Notice,
    SecretNamespaces, condition, truncate,
};
use crate::policy::{CACHE_SYNC_WAIT, owners};

/// Delay before retry `attempts` + 1 (after `attempts` failures): base * 2^(attempts-1), capped.
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    base.saturating_mul(1u32 << exp).min(max)
}

/// Time from `t` to `now` (0 when `t` is in the future).
fn elapsed(now: Timestamp, t: &Time) -> Duration {
    Duration::try_from(now.duration_since(t.0)).unwrap_or_default()
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

/// The image as pods name it, with its tag and a short digest, for `kubectl get`:
/// `registry/repo:tag@sha256:0123456789ab`.
pub fn display_reference(img: &AcceleratedImage) -> String {
    let named = img
        .annotations()
        .get(ANN_REFERENCE)
        .map(|r| r.split('@').next().unwrap_or(r).to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| img.spec.image.clone());
    let d = &img.spec.digest;
    let short = d.get(..d.find(':').map_or(0, |i| i + 13)).unwrap_or(d);
    format!("{named}@{short}")
}

/// The plan source of a freshly built (predicted) artifact.
fn predicted(img: &AcceleratedImage) -> PlanSource {
    match img.spec.profile {
        Profile::Default => PlanSource::None,
        Profile::StartupLocalV1 => PlanSource::Predicted,
    }
}

/// The registry host of `registry/repository`.
fn registry_host(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// What to do with an image now.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Built for its current settings: nothing to do until the image changes.
    UpToDate,
    /// No active owner (none left, or all paused): nothing new is built for it.
    Idle,
    /// Failed `max_attempts` times for these owners: stays Failed until they change.
    GaveUp,
    /// Its last attempt was interrupted and it has had `max_attempts`: mark it Failed (see
    /// [`interrupted_status`]); it stays so until the owners change.
    GaveUpInterrupted,
    /// Failed recently: look again after this delay.
    Backoff(Duration),
    /// Build now (boxed: the attempt carries a whole status).
    Build(Box<Attempt>),
}

/// One build attempt.
#[derive(Debug, PartialEq)]
pub struct Attempt {
    /// 1 for the first attempt (after a reset too).
    pub number: u32,
    /// The image's status before the attempt, its backoff reset when owners or settings
    /// changed (the statuses written are derived from it).
    pub previous: AcceleratedImageStatus,
    /// See [`AcceleratedImageStatus::owner_generations`].
    pub owner_generations: String,
    /// Whether the owners or settings changed since the last attempt (reset the backoff).
    pub reset: bool,
}

/// Decides what to do with `img` given its owning policies, at `now`.
pub fn decide(
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    now: Timestamp,
    s: &BuildSettings,
) -> Decision {
    let mut prev = img.status.clone().unwrap_or_default();
    // The spec changed since the last attempt (its first policy moved the artifact repository):
    // what was built, or failed, was for other settings.
    let settings_changed = prev
        .observed_generation
        .is_some_and(|g| Some(g) != img.metadata.generation);
    if prev.phase == Phase::Ready && prev.artifact.is_some() && !settings_changed {
        return Decision::UpToDate;
    }
    // Paused policies build nothing new; an image nobody active owns waits.
    if owners.is_empty() || owners.iter().all(|p| p.spec.paused) {
        return Decision::Idle;
    }
    let owner_generations = owner_generations(owners);
    // The owners or the image's own settings changed (new credentials, another artifact
    // repository, a new owner...): the failure may be gone, so retry now with a fresh backoff.
    // Building here means the attempt was interrupted (a graceful stop writes Pending): it
    // counts as failed.
    let interrupted = prev.phase == Phase::Building;
    let failed = prev.phase == Phase::Failed || interrupted;
    // Owners that changed since a failure may have fixed it; an interrupted attempt keeps
    // counting (its status may predate the owners it was built for).
    let reset = (prev.phase == Phase::Failed
        && prev.owner_generations.as_ref() != Some(&owner_generations))
        || settings_changed;
    if reset {
        prev.attempts = 0;
        prev.last_attempt_time = None;
    }
    if failed && !reset {
        if prev.attempts >= s.max_attempts {
            return if interrupted {
                Decision::GaveUpInterrupted
            } else {
                Decision::GaveUp
            };
        }
        let wait = backoff(s.backoff_base, s.backoff_max, prev.attempts);
        let waited = prev
            .last_attempt_time
            .as_ref()
            .map(|t| elapsed(now, t))
            .unwrap_or(wait);
        if waited < wait {
            return Decision::Backoff(wait - waited);
        }
    }
    Decision::Build(Box::new(Attempt {
        number: prev.attempts.saturating_add(1),
        previous: prev,
        owner_generations,
        reset,
    }))
}

/// A status to write and the event that announces it.
#[derive(Debug, PartialEq)]
pub struct Update {
    pub status: AcceleratedImageStatus,
    pub notice: Option<Notice>,
}

/// The status recording that `attempt` started at `now` (written before the build, so the
/// attempt counts even if the controller dies during it).
pub fn building_status(img: &AcceleratedImage, attempt: &Attempt, now: Timestamp) -> Update {
    let prev = &attempt.previous;
    let n = attempt.number;
    let status = AcceleratedImageStatus {
        phase: Phase::Building,
        reference: Some(display_reference(img)),
        attempts: n,
        last_attempt_time: Some(Time(now)),
        observed_generation: img.metadata.generation,
        owner_generations: Some(attempt.owner_generations.clone()),
        conditions: vec![condition(
            &prev.conditions,
            "Ready",
            false,
            "Building",
            &format!("build attempt {n} running"),
            img.metadata.generation,
        )],
        ..prev.clone()
    };
    // A retry after a restart is no news.
    let notice = (prev.phase != Phase::Building).then(|| {
        Notice::normal(
            "Building",
            format!(
                "building {}@{} for {}",
                img.spec.image, img.spec.digest, img.spec.platform
            ),
        )
    });
    Update { status, notice }
}

/// How an attempt ended.
#[derive(Debug)]
pub enum AttemptResult {
    /// The controller is stopping; nothing partial was pushed (the manifest goes last).
    Abandoned,
    Built {
        outcome: BuildOutcome,
        seconds: f64,
    },
    Failed(BuilderError),
}

/// The status after `attempt` ended with `result`; `building` is what [`building_status`] gave.
pub fn compute_status(
    img: &AcceleratedImage,
    attempt: &Attempt,
    building: &AcceleratedImageStatus,
    result: &AttemptResult,
) -> Update {
    let prev = &attempt.previous;
    let generation = img.metadata.generation;
    match result {
        AttemptResult::Abandoned => Update {
            // Handed back to the queue of whichever controller runs next; this attempt did not
            // fail, so it does not count.
            status: AcceleratedImageStatus {
                phase: Phase::Pending,
                attempts: prev.attempts,
                conditions: vec![condition(
                    &prev.conditions,
                    "Ready",
                    false,
                    "Abandoned",
                    "build abandoned at controller shutdown; it restarts with the next controller",
                    generation,
                )],
                ..building.clone()
            },
            notice: None,
        },
        AttemptResult::Built {
            outcome: o,
            seconds,
        } => {
            let msg = ready_message(o);
            Update {
                status: AcceleratedImageStatus {
                    phase: Phase::Ready,
                    reference: Some(display_reference(img)),
                    plan_source: Some(predicted(img)),
                    // A rebuild for new settings starts learning again.
                    recorded_starts: Vec::new(),
                    recording_attempt: None,
                    startup_size: Some(crate::learn::human_bytes(o.startup_bytes)),
                    artifact: Some(o.artifact.clone()),
                    default_artifact: o.default_artifact.clone(),
                    startup_paths: o.startup_paths,
                    startup_bytes: o.startup_bytes,
                    layers_indexed: o.layers_indexed,
                    layers_skipped: o.layers_skipped,
                    build_duration_seconds: Some((seconds * 1000.0).round() / 1000.0),
                    attempts: attempt.number,
                    last_attempt_time: building.last_attempt_time.clone(),
                    last_error: None,
                    owner_generations: Some(attempt.owner_generations.clone()),
                    conditions: vec![condition(
                        &building.conditions,
                        "Ready",
                        true,
                        if o.adopted { "Adopted" } else { "Built" },
                        &msg,
                        generation,
                    )],
                    observed_generation: generation,
                },
                notice: Some(Notice::normal("Ready", msg)),
            }
        }
        AttemptResult::Failed(e) => {
            let e = truncate(&e.to_string(), 4096);
            Update {
                status: AcceleratedImageStatus {
                    phase: Phase::Failed,
                    last_error: Some(e.clone()),
                    conditions: vec![condition(
                        &prev.conditions,
                        "Ready",
                        false,
                        "BuildFailed",
                        &e,
                        generation,
                    )],
                    ..building.clone()
                },
                notice: Some(Notice::warning(
                    "BuildFailed",
                    format!("attempt {}: {e}", attempt.number),
                )),
            }
        }
    }
}

/// The Failed status of an image whose every attempt was interrupted, up to `max_attempts`.
pub fn interrupted_status(img: &AcceleratedImage) -> Update {
    let prev = img.status.clone().unwrap_or_default();
    let e = format!(
        "the controller stopped during each of {} build attempt(s) (killed, out of memory, or \
         lost its lease); not retried until the policy or image changes",
        prev.attempts
    );
    Update {
        status: AcceleratedImageStatus {
            phase: Phase::Failed,
            last_error: Some(e.clone()),
            conditions: vec![condition(
                &prev.conditions,
                "Ready",
                false,
                "BuildInterrupted",
                &e,
                img.metadata.generation,
            )],
            ..prev
        },
        notice: Some(Notice::warning("BuildInterrupted", e)),
    }
}

fn ready_message(o: &BuildOutcome) -> String {
    let result = if o.adopted { "adopted" } else { "built" };
    format!(
        "artifact {} ({result}) in {}; {} layer(s) indexed",
        o.artifact.digest, o.artifact.repository, o.layers_indexed
    )
}

/// When to look at the image again after an attempt: a failure is retried after its backoff
/// until `max_attempts`; anything else waits for a change.
pub fn next_action(attempt: &Attempt, result: &AttemptResult, s: &BuildSettings) -> Action {
    match result {
        AttemptResult::Failed(_) if attempt.number < s.max_attempts => {
            Action::requeue(backoff(s.backoff_base, s.backoff_max, attempt.number))
        }
        _ => Action::await_change(),
    }
}

/// The secrets a build authenticates with: every owner's (in the namespaces `allowed`; the
/// others are reported in `problems`), and the pull secrets of the pods that run the image;
/// sorted, without duplicates.
fn credential_refs(
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    allowed: &SecretNamespaces,
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut refs = allowed.filter(
        owners
            .iter()
            .flat_map(|p| p.spec.registry_credentials.iter())
            .map(|s| (s.namespace.clone(), s.name.clone())),
        problems,
    );
    if let Some(ps) = img.annotations().get(ANN_PULL_SECRETS) {
        refs.extend(
            ps.split(',')
                .filter_map(|s| s.split_once('/'))
                .map(|(ns, n)| (ns.to_string(), n.to_string())),
        );
    }
    refs.sort();
    refs.dedup();
    refs
}

async fn apply_status(
    ctx: &Context,
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

/// Writes an update's status, then publishes its event.
pub(crate) async fn write(
    ctx: &Context,
    img: &AcceleratedImage,
    update: Update,
) -> Result<(), Error> {
    apply_status(ctx, img, &update.status).await?;
    if let Some(n) = update.notice {
        ctx.event(img, n).await;
    }
    Ok(())
}

/// The image's owning policies as the apiserver has them now; None when one cannot be read.
async fn fresh_owners(
    ctx: &Context,
    img: &AcceleratedImage,
) -> Option<Vec<Arc<AccelerationPolicy>>> {
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

/// The owning policies: from the cache, or fresh from the apiserver for a Failed image.
async fn current_owners(ctx: &Context, img: &AcceleratedImage) -> Vec<Arc<AccelerationPolicy>> {
    let cached: Vec<Arc<AccelerationPolicy>> = owners(img)
        .iter()
        .filter_map(|r| ctx.policies.get(r))
        .collect();
    if img
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Failed)
    {
        // This reconcile may have been triggered by a policy change that the policy cache has
        // not seen yet (the trigger is another watch): read the owners fresh, so a changed
        // policy is not missed and the image left Failed. Failed images are few.
        return fresh_owners(ctx, img).await.unwrap_or(cached);
    }
    cached
}

/// Runs the build of `img` (bounded by the build timeout), unless the controller stops first.
pub(crate) async fn run_build(
    ctx: &Context,
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    recorded: Option<Arc<RecordedInput>>,
    mut shutdown: watch::Receiver<bool>,
) -> (AttemptResult, f64) {
    let mut problems = Vec::new();
    let refs = credential_refs(img, owners, &ctx.secret_namespaces, &mut problems);
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
        recorded,
    };
    if let Some(repo) = &req.artifact_repository
        && !ctx.artifact_repositories.allows(repo)
    {
        return (
            AttemptResult::Failed(BuilderError::RepositoryNotAllowed(repo.clone())),
            0.0,
        );
    }
    let timeout = ctx.build.timeout;
    ctx.metrics.builds_running().inc();
    let t0 = Instant::now();
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, ctx.builder.build(&req)) => Some(r),
        _ = shutdown.wait_for(|v| *v) => None,
    };
    ctx.metrics.builds_running().dec();
    let seconds = t0.elapsed().as_secs_f64();
    let result = match outcome {
        None => AttemptResult::Abandoned,
        Some(Err(_)) => AttemptResult::Failed(BuilderError::Timeout(timeout)),
        Some(Ok(Err(e))) => AttemptResult::Failed(e),
        Some(Ok(Ok(outcome))) => AttemptResult::Built { outcome, seconds },
    };
    (result, seconds)
}

#[tracing::instrument(name = "build_image", skip_all, fields(image = %img.name_any()))]
pub async fn reconcile(
    img: Arc<AcceleratedImage>,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) -> Result<Action, Error> {
    ctx.metrics.reconcile("AcceleratedImage");
    if img.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    match tokio::time::timeout(CACHE_SYNC_WAIT, ctx.policies.wait_until_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => {
            return Err(Error::CacheStopped {
                cache: "policy",
                source,
            });
        }
        Err(_) => return Err(Error::CacheNotSynced("policy")),
    }

    // Building in the cache is either an attempt a stopped controller left behind or this
    // controller's own status write that the cache has not caught up with (the next
    // reconcile can come first): decide on what the apiserver has now.
    let img = if img
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Building)
    {
        let api: Api<AcceleratedImage> = Api::all(ctx.client.clone());
        match api
            .get_opt(&img.name_any())
            .await
            .map_err(Error::kube(format!("reading {}", img.name_any())))?
        {
            Some(fresh) => Arc::new(fresh),
            None => return Ok(Action::await_change()),
        }
    } else {
        img
    };

    // Select and decide.
    let owner_policies = current_owners(&ctx, &img).await;
    let attempt = match decide(&img, &owner_policies, Timestamp::now(), &ctx.build) {
        Decision::Build(a) => *a,
        Decision::Backoff(wait) => return Ok(Action::requeue(wait)),
        Decision::UpToDate => return learn(&ctx, &img, &owner_policies, shutdown).await,
        Decision::Idle | Decision::GaveUp => {
            return Ok(Action::await_change());
        }
        Decision::GaveUpInterrupted => {
            warn!(
                "every build attempt was interrupted; giving up until the image or its policies change"
            );
            write(&ctx, &img, interrupted_status(&img)).await?;
            return Ok(Action::await_change());
        }
    };
    if attempt.reset {
        info!(
            attempts = img.status.as_ref().map(|s| s.attempts).unwrap_or_default(),
            phase = ?attempt.previous.phase,
            "owning policies or settings changed; building again"
        );
    }

    let Some(_slot) = build_slot(&ctx, &img, &shutdown).await? else {
        return Ok(Action::await_change());
    };

    // Apply: record the attempt, build, record its result.
    let building = building_status(&img, &attempt, Timestamp::now());
    let building_st = building.status.clone();
    write(&ctx, &img, building).await?;
    let (result, secs) = run_build(&ctx, &img, &owner_policies, None, shutdown).await;
    match &result {
        AttemptResult::Abandoned => info!("build abandoned at shutdown"),
        AttemptResult::Built { outcome, .. } => {
            let r = if outcome.adopted { "adopted" } else { "built" };
            ctx.metrics.build_finished(r, secs, outcome.bytes_indexed);
            info!(msg = %ready_message(outcome), seconds = secs, "image ready");
        }
        AttemptResult::Failed(e) => {
            ctx.metrics.build_finished("failed", secs, 0);
            ctx.metrics.build_failed(e.reason());
            warn!(error = %e, reason = e.reason(), attempt = attempt.number, "build failed");
        }
    }
    let update = compute_status(&img, &attempt, &building_st, &result);
    write(&ctx, &img, update).await?;
    Ok(next_action(&attempt, &result, &ctx.build))
}

/// A global and a per-registry build slot, held while its value lives; `None` when the
/// controller is stopping.
async fn build_slot<'a>(
    ctx: &'a Context,
    img: &AcceleratedImage,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<Slot<'a>>, Error> {
    ctx.metrics.queue_depth().inc();
    let reg = ctx.limits.registry(registry_host(&img.spec.image));
    let (g, r) = async {
        let g = ctx.limits.global.acquire().await;
        let r = reg.acquire_owned().await;
        (g, r)
    }
    .await;
    ctx.metrics.queue_depth().dec();
    let (Ok(g), Ok(r)) = (g, r) else {
        return Err(Error::QueueClosed);
    };
    if *shutdown.borrow() {
        return Ok(None);
    }
    Ok(Some((g, r)))
}

/// Build permits (global, per registry), released when dropped.
type Slot<'a> = (
    tokio::sync::SemaphorePermit<'a>,
    tokio::sync::OwnedSemaphorePermit,
);

/// A Ready image: fill in what older controllers did not write, drop records it will never
/// merge, and build its recorded plan when new starts came (crate::learn).
async fn learn(
    ctx: &Context,
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    shutdown: watch::Receiver<bool>,
) -> Result<Action, Error> {
    let st = img.status.clone().unwrap_or_default();
    if st.reference.is_none() || st.plan_source.is_none() {
        let status = AcceleratedImageStatus {
            reference: Some(display_reference(img)),
            plan_source: st.plan_source.or(Some(predicted(img))),
            startup_size: Some(crate::learn::human_bytes(st.startup_bytes)),
            ..st
        };
        write(
            ctx,
            img,
            Update {
                status,
                notice: None,
            },
        )
        .await?;
        // The write brings the image back with its new status.
        return Ok(Action::await_change());
    }
    let records = ctx.records.state();
    let extra = crate::learn::surplus(img, owners, &records);
    if !extra.is_empty() {
        info!(
            records = extra.len(),
            "dropping startup records the plan will not merge"
        );
        crate::learn::prune(ctx, &extra).await;
    }
    let Some(pick) = crate::learn::pick(img, owners, &records) else {
        return Ok(Action::await_change());
    };
    let Some(_slot) = build_slot(ctx, img, &shutdown).await? else {
        return Ok(Action::await_change());
    };
    build_recorded(ctx, img, owners, &pick, shutdown).await?;
    Ok(Action::await_change())
}

/// Builds and pins the recorded plan of `p` (the caller holds a build slot).
async fn build_recorded(
    ctx: &Context,
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    p: &crate::learn::Pick,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // The cache holds records without their traces (crate::learn::strip_trace).
    let api: Api<talaria_api::StartupRecord> = Api::all(ctx.client.clone());
    let mut traces = Vec::with_capacity(p.records.len());
    for r in &p.records {
        traces.push(match api.get_opt(&r.name_any()).await {
            // Records are immutable (schema): the same object is the same record.
            Ok(Some(fresh)) if fresh.metadata.uid == r.metadata.uid => Ok(fresh.spec.trace),
            Ok(_) => Err("deleted or replaced since it was seen".to_string()),
            Err(e) => Err(format!("reading it: {e}")),
        });
    }
    let (trace, bad) = crate::learn::merged_trace(p, &traces);
    for b in &bad {
        warn!(record = %b, "startup record left out");
    }
    let st = img.status.clone().unwrap_or_default();
    let (status, notice) = match st.default_artifact.clone() {
        _ if trace.files() == 0 => {
            let why = if bad.is_empty() {
                "the recorded starts read no file of the image's lazily mounted layers".to_string()
            } else {
                format!("no usable record: {}", bad.join("; "))
            };
            crate::learn::recording_failed_status(img, p, &why)
        }
        None => crate::learn::recording_failed_status(img, p, "no default artifact to build on"),
        Some(default_artifact) => {
            info!(
                records = %p.key,
                files = trace.files(),
                bytes = trace.bytes(),
                "building the recorded plan"
            );
            let input = RecordedInput {
                trace,
                budget: p.settings.max_bytes,
                default_artifact,
                created: Timestamp::now().to_string(),
            };
            let (result, secs) = run_build(ctx, img, owners, Some(Arc::new(input)), shutdown).await;
            match result {
                AttemptResult::Abandoned => return Ok(()),
                AttemptResult::Built { outcome, seconds } => {
                    ctx.metrics
                        .build_finished("recorded", seconds, outcome.bytes_indexed);
                    crate::learn::recorded_status(img, p, &outcome, seconds)
                }
                AttemptResult::Failed(e) => {
                    ctx.metrics.build_finished("failed", secs, 0);
                    ctx.metrics.build_failed(e.reason());
                    warn!(error = %e, reason = e.reason(), "recorded build failed");
                    crate::learn::recording_failed_status(img, p, &e.to_string())
                }
            }
        }
    };
    write(
        ctx,
        img,
        Update {
            status,
            notice: Some(notice),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use talaria_api::{AcceleratedImageSpec, ArtifactRef, SecretRef};

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

    fn policy(uid: &str, generation: i64) -> Arc<AccelerationPolicy> {
        let mut p = AccelerationPolicy::new("p", Default::default());
        p.metadata.uid = Some(uid.into());
        p.metadata.generation = Some(generation);
        Arc::new(p)
    }

    #[test]
    fn owner_generations_change_with_a_new_generation_or_owner() {
        let p = policy;
        let a = owner_generations(&[p("b", 1), p("a", 2)]);
        assert_eq!(a, "a=2,b=1");
        assert_eq!(a, owner_generations(&[p("a", 2), p("b", 1)]));
        assert_ne!(a, owner_generations(&[p("a", 3), p("b", 1)]));
        assert_ne!(a, owner_generations(&[p("a", 2)]));
    }

    fn settings() -> BuildSettings {
        BuildSettings {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
            max_attempts: 3,
            ..Default::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000_000).expect("timestamp")
    }

    fn ago(secs: i64) -> Time {
        Time(Timestamp::from_second(1_000_000 - secs).expect("timestamp"))
    }

    /// An image at generation 1 with `status`.
    fn image(status: Option<AcceleratedImageStatus>) -> AcceleratedImage {
        let mut i = AcceleratedImage::new(
            "ai-x",
            AcceleratedImageSpec {
                image: "r.io/app".into(),
                digest: "sha256:d".into(),
                platform: "linux/amd64".into(),
                ..Default::default()
            },
        );
        i.metadata.generation = Some(1);
        i.status = status;
        i
    }

    fn failed(attempts: u32, secs_ago: i64, owners: &str) -> AcceleratedImageStatus {
        AcceleratedImageStatus {
            phase: Phase::Failed,
            attempts,
            last_attempt_time: Some(ago(secs_ago)),
            owner_generations: Some(owners.into()),
            observed_generation: Some(1),
            last_error: Some("boom".into()),
            ..Default::default()
        }
    }

    fn attempt_of(d: Decision) -> Attempt {
        match d {
            Decision::Build(a) => *a,
            other => panic!("expected a build, got {other:?}"),
        }
    }

    #[test]
    fn a_ready_image_is_left_alone_until_its_settings_change() {
        let ready = AcceleratedImageStatus {
            phase: Phase::Ready,
            artifact: Some(ArtifactRef::default()),
            attempts: 2,
            observed_generation: Some(1),
            ..Default::default()
        };
        let owners = [policy("a", 1)];
        let img = image(Some(ready));
        assert_eq!(
            decide(&img, &owners, now(), &settings()),
            Decision::UpToDate
        );
        // Even without owners: nothing to undo.
        assert_eq!(decide(&img, &[], now(), &settings()), Decision::UpToDate);
        let mut moved = img.clone();
        moved.metadata.generation = Some(2);
        let a = attempt_of(decide(&moved, &owners, now(), &settings()));
        assert!(a.reset);
        assert_eq!(a.number, 1, "a settings change starts the count again");
    }

    #[test]
    fn an_image_without_active_owners_waits() {
        let img = image(None);
        assert_eq!(decide(&img, &[], now(), &settings()), Decision::Idle);
        let mut paused = AccelerationPolicy::new("p", Default::default());
        paused.spec.paused = true;
        let owners = [Arc::new(paused), policy("b", 1)];
        assert!(matches!(
            decide(&img, &owners, now(), &settings()),
            Decision::Build(_)
        ));
        assert_eq!(
            decide(&img, &owners[..1], now(), &settings()),
            Decision::Idle
        );
    }

    #[test]
    fn a_new_image_builds_its_first_attempt() {
        let a = attempt_of(decide(&image(None), &[policy("a", 1)], now(), &settings()));
        assert_eq!((a.number, a.reset), (1, false));
        assert_eq!(a.owner_generations, "a=1");
    }

    #[test]
    fn failures_back_off_then_retry_then_give_up() {
        let owners = [policy("a", 1)];
        let s = settings();
        // Two failures: the third attempt waits 20 s after the second.
        let img = image(Some(failed(2, 5, "a=1")));
        assert_eq!(
            decide(&img, &owners, now(), &s),
            Decision::Backoff(Duration::from_secs(15))
        );
        let img = image(Some(failed(2, 25, "a=1")));
        let a = attempt_of(decide(&img, &owners, now(), &s));
        assert_eq!((a.number, a.reset), (3, false));
        // A clock behind the last attempt waits the whole backoff, not less.
        let img = image(Some(failed(2, -100, "a=1")));
        assert_eq!(
            decide(&img, &owners, now(), &s),
            Decision::Backoff(Duration::from_secs(20))
        );
        let img = image(Some(failed(3, 10_000, "a=1")));
        assert_eq!(decide(&img, &owners, now(), &s), Decision::GaveUp);
    }

    #[test]
    fn an_interrupted_build_counts_as_a_failed_attempt() {
        let owners = [policy("a", 1)];
        let s = settings();
        let building = |attempts, secs_ago| {
            let mut st = failed(attempts, secs_ago, "a=1");
            st.phase = Phase::Building;
            st.last_error = None;
            st
        };
        // Killed during its second attempt: backoff applies as after a failure.
        let img = image(Some(building(2, 5)));
        assert_eq!(
            decide(&img, &owners, now(), &s),
            Decision::Backoff(Duration::from_secs(15))
        );
        let a = attempt_of(decide(&image(Some(building(2, 25))), &owners, now(), &s));
        assert_eq!((a.number, a.reset), (3, false));
        // Killed during every attempt: given up, not rebuilt by every new leader.
        let img = image(Some(building(3, 10_000)));
        assert_eq!(
            decide(&img, &owners, now(), &s),
            Decision::GaveUpInterrupted
        );
        let u = interrupted_status(&img);
        assert_eq!(u.status.phase, Phase::Failed);
        assert_eq!(u.status.attempts, 3);
        assert!(
            u.status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("3 build attempt")),
            "{:?}",
            u.status.last_error
        );
        assert!(u.notice.is_some());
        // Once marked Failed, new owners start the count again.
        let mut failed_img = img.clone();
        failed_img.status = Some(u.status);
        let a = attempt_of(decide(&failed_img, &[policy("a", 2)], now(), &s));
        assert_eq!((a.number, a.reset), (1, true));
    }

    #[test]
    fn changed_owners_retry_a_failed_image_at_once() {
        let img = image(Some(failed(3, 1, "a=1")));
        let a = attempt_of(decide(&img, &[policy("a", 2)], now(), &settings()));
        assert!(a.reset);
        assert_eq!(a.number, 1);
        assert_eq!(a.previous.attempts, 0);
        assert_eq!(a.previous.last_attempt_time, None);
        assert_eq!(a.owner_generations, "a=2");
    }

    #[test]
    fn the_building_status_counts_the_attempt_and_announces_only_news() {
        let img = image(Some(failed(1, 100, "a=1")));
        let a = attempt_of(decide(&img, &[policy("a", 1)], now(), &settings()));
        let u = building_status(&img, &a, now());
        assert_eq!(u.status.phase, Phase::Building);
        assert_eq!(u.status.attempts, 2);
        assert_eq!(u.status.last_attempt_time, Some(Time(now())));
        assert_eq!(
            u.status.last_error.as_deref(),
            Some("boom"),
            "kept until the result"
        );
        assert_eq!(u.status.conditions[0].reason, "Building");
        assert_eq!(u.notice.map(|n| n.reason), Some("Building"));

        // Building already (a controller killed mid-build, its backoff over): no second
        // event.
        let mut restarted = img.clone();
        let mut st = u.status.clone();
        st.last_attempt_time = failed(1, 100, "a=1").last_attempt_time;
        restarted.status = Some(st);
        let a2 = attempt_of(decide(&restarted, &[policy("a", 1)], now(), &settings()));
        assert_eq!(a2.number, 3, "the interrupted attempt counts");
        assert_eq!(building_status(&restarted, &a2, now()).notice, None);
    }

    fn started() -> (AcceleratedImage, Attempt, AcceleratedImageStatus) {
        let img = image(Some(failed(1, 100, "a=1")));
        let a = attempt_of(decide(&img, &[policy("a", 1)], now(), &settings()));
        let building = building_status(&img, &a, now()).status;
        (img, a, building)
    }

    #[test]
    fn a_built_image_is_ready_with_its_artifacts() {
        let (img, a, building) = started();
        let outcome = BuildOutcome {
            artifact: ArtifactRef {
                repository: "r.io/app".into(),
                digest: "sha256:art".into(),
                size: 10,
            },
            layers_indexed: 3,
            adopted: true,
            ..Default::default()
        };
        let result = AttemptResult::Built {
            outcome,
            seconds: 1.23456,
        };
        let u = compute_status(&img, &a, &building, &result);
        let st = &u.status;
        assert_eq!(st.phase, Phase::Ready);
        assert_eq!(st.attempts, 2);
        assert_eq!(st.last_error, None);
        assert_eq!(st.build_duration_seconds, Some(1.235));
        assert_eq!(
            st.artifact.as_ref().map(|r| r.digest.as_str()),
            Some("sha256:art")
        );
        assert_eq!(st.conditions[0].reason, "Adopted");
        assert_eq!(st.conditions[0].status, "True");
        let n = u.notice.expect("an event");
        assert_eq!((n.warning, n.reason), (false, "Ready"));
        assert!(n.note.contains("(adopted)"), "{}", n.note);
        assert_eq!(
            next_action(&a, &result, &settings()),
            Action::await_change()
        );
    }

    #[test]
    fn a_failed_build_records_its_error_and_backs_off() {
        let (img, a, building) = started();
        let result = AttemptResult::Failed(BuilderError::Timeout(Duration::from_secs(5)));
        let u = compute_status(&img, &a, &building, &result);
        assert_eq!(u.status.phase, Phase::Failed);
        assert_eq!(u.status.attempts, 2);
        assert_eq!(
            u.status.last_error.as_deref(),
            Some("build timed out after 5s")
        );
        assert_eq!(u.status.conditions[0].reason, "BuildFailed");
        let n = u.notice.expect("an event");
        assert!(n.warning && n.note.starts_with("attempt 2: "), "{n:?}");
        assert_eq!(
            next_action(&a, &result, &settings()),
            Action::requeue(Duration::from_secs(20))
        );
        // The last allowed attempt: Failed until something changes.
        let last = Attempt { number: 3, ..a };
        assert_eq!(
            next_action(&last, &result, &settings()),
            Action::await_change()
        );
    }

    #[test]
    fn an_abandoned_build_is_handed_back_uncounted() {
        let (img, a, building) = started();
        let u = compute_status(&img, &a, &building, &AttemptResult::Abandoned);
        assert_eq!(u.status.phase, Phase::Pending);
        assert_eq!(u.status.attempts, 1, "the abandoned attempt does not count");
        assert_eq!(u.status.conditions[0].reason, "Abandoned");
        assert_eq!(u.notice, None);
        assert_eq!(
            next_action(&a, &AttemptResult::Abandoned, &settings()),
            Action::await_change()
        );
    }

    #[test]
    fn builds_use_every_owners_and_every_pods_secrets_once() {
        let mut p = AccelerationPolicy::new("p", Default::default());
        p.spec.registry_credentials = vec![SecretRef {
            namespace: "ns".into(),
            name: "team".into(),
        }];
        let mut img = image(None);
        img.annotations_mut()
            .insert(ANN_PULL_SECRETS.into(), "ns/team,app/pull,garbage".into());
        let owners = [Arc::new(p)];
        let refs = credential_refs(&img, &owners, &SecretNamespaces::Any, &mut Vec::new());
        assert_eq!(
            refs,
            [
                ("app".to_string(), "pull".to_string()),
                ("ns".to_string(), "team".to_string())
            ]
        );
        // A policy's secret outside the allowed namespaces is dropped and reported; the
        // pods' own pull secrets stay.
        img.annotations_mut()
            .insert(ANN_PULL_SECRETS.into(), "app/pull".into());
        let only = SecretNamespaces::Only(["talaria-system".to_string()].into());
        let mut problems = Vec::new();
        let refs = credential_refs(&img, &owners, &only, &mut problems);
        assert_eq!(refs, [("app".to_string(), "pull".to_string())]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("ns/team"), "{problems:?}");
    }
}
