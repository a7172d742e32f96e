//! The learning loop, controller side: nodes write a StartupRecord for the first starts of an
//! image whose plan is predicted; the controller merges up to `recording.starts` of them and
//! builds the recorded plan and pack from the image's own layers, then pins that artifact in
//! place of the predicted one (docs/learning.md). A record can only change which bytes are
//! fetched first: the pack is cut from the real layers, and the trace is bounded by the
//! schema and the decoder's caps.
//!
//! [`pick`] decides and the statuses are computed here (pure); `image::build_recorded` runs
//! the build and writes them.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use talaria_api::{
    AcceleratedImage, AcceleratedImageStatus, AccelerationPolicy, Phase, PlanSource, Profile,
    RecordedStart, RecordingSettings, StartupRecord,
};
use talaria_artifact::startup::StartupTrace;
use talaria_artifact::startup::trace::merge_traces;
use tracing::warn;

use crate::builder::BuildOutcome;
use crate::context::{Context, Notice, condition, truncate};

/// Records of `img` to merge now: the first `starts` (by time, then name) of the records of
/// its digest, when they are not what its plan already merges or what last failed.
#[derive(Debug)]
pub struct Pick {
    pub records: Vec<Arc<StartupRecord>>,
    /// The records' names, sorted and comma-separated.
    pub key: String,
    pub settings: RecordingSettings,
}

/// The records of `img` (its name and digest), oldest first.
pub fn records_of(img: &AcceleratedImage, all: &[Arc<StartupRecord>]) -> Vec<Arc<StartupRecord>> {
    let name = img.name_any();
    let mut v: Vec<Arc<StartupRecord>> = all
        .iter()
        .filter(|r| r.spec.accelerated_image == name && r.spec.digest == img.spec.digest)
        .cloned()
        .collect();
    v.sort_by(|a, b| {
        (a.spec.recorded_at.0, a.name_any()).cmp(&(b.spec.recorded_at.0, b.name_any()))
    });
    v
}

fn key_of(records: &[Arc<StartupRecord>]) -> String {
    let mut names: Vec<String> = records.iter().map(|r| r.name_any()).collect();
    names.sort();
    names.join(",")
}

/// What to merge into `img`'s recorded plan now, if anything.
pub fn pick(
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    records: &[Arc<StartupRecord>],
) -> Option<Pick> {
    let st = img.status.as_ref()?;
    if st.phase != Phase::Ready
        || st.artifact.is_none()
        || st.default_artifact.is_none()
        || img.spec.profile == Profile::Default
    {
        return None;
    }
    let settings = RecordingSettings::of(owners.iter().map(|p| p.as_ref()));
    if !settings.enabled {
        return None;
    }
    let mine = records_of(img, records);
    let chosen: Vec<Arc<StartupRecord>> = mine
        .into_iter()
        .take(usize::try_from(settings.starts).unwrap_or(usize::MAX))
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let key = key_of(&chosen);
    let merged = {
        let mut v: Vec<&str> = st
            .recorded_starts
            .iter()
            .map(|s| s.record.as_str())
            .collect();
        v.sort_unstable();
        v.join(",")
    };
    let merged_all = st.plan_source == Some(PlanSource::Recorded) && merged == key;
    if merged_all || st.recording_attempt.as_deref() == Some(key.as_str()) {
        return None;
    }
    Some(Pick {
        records: chosen,
        key,
        settings,
    })
}

/// Records of `img` that will never be merged (its plan has all the starts it wants).
pub fn surplus(
    img: &AcceleratedImage,
    owners: &[Arc<AccelerationPolicy>],
    records: &[Arc<StartupRecord>],
) -> Vec<String> {
    let Some(st) = img.status.as_ref() else {
        return Vec::new();
    };
    let settings = RecordingSettings::of(owners.iter().map(|p| p.as_ref()));
    let full = st.plan_source == Some(PlanSource::Recorded)
        && st.recorded_starts.len() >= usize::try_from(settings.starts).unwrap_or(usize::MAX);
    if !full {
        return Vec::new();
    }
    records_of(img, records)
        .iter()
        .map(|r| r.name_any())
        .filter(|n| !st.recorded_starts.iter().any(|s| &s.record == n))
        .collect()
}

/// The watch cache keeps records without their traces (up to 1 MiB each, and nodes write
/// them): a trace is read from the apiserver only when its record is merged.
pub fn strip_trace(r: &mut StartupRecord) {
    r.spec.trace.clear();
    r.metadata.managed_fields = None;
}

/// The merged trace of the picked records, whose traces are `traces` (by record, read
/// fresh); records that do not decode are left out (and named in the second value).
pub fn merged_trace(p: &Pick, traces: &[Result<String, String>]) -> (StartupTrace, Vec<String>) {
    let mut starts = Vec::new();
    let mut bad = Vec::new();
    for (r, t) in p.records.iter().zip(traces) {
        let decoded = t
            .as_ref()
            .map_err(|e| e.clone())
            .and_then(|t| StartupTrace::from_compact(t).map_err(|e| e.to_string()));
        match decoded {
            Ok(t) => starts.push((r.spec.command.clone(), t)),
            Err(e) => bad.push(format!("{}: {e}", r.name_any())),
        }
    }
    (merge_traces(&starts), bad)
}

/// `1.5 GiB`-style sizes for `kubectl get`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

/// The status once the recorded build of `p` gave `o`.
pub fn recorded_status(
    img: &AcceleratedImage,
    p: &Pick,
    o: &BuildOutcome,
    seconds: f64,
) -> (AcceleratedImageStatus, Notice) {
    let prev = img.status.clone().unwrap_or_default();
    let starts: Vec<RecordedStart> = p
        .records
        .iter()
        .map(|r| RecordedStart {
            record: r.name_any(),
            node: r.spec.node.clone(),
            pod: r.spec.pod.clone(),
            recorded_at: r.spec.recorded_at.clone(),
        })
        .collect();
    let from: Vec<String> = starts
        .iter()
        .map(|s| match &s.pod {
            Some(pod) => format!("{pod} on {}", s.node),
            None => s.node.clone(),
        })
        .collect();
    let msg = format!(
        "recorded plan from {} start(s) ({}): artifact {}, {} file(s), {} first",
        starts.len(),
        from.join("; "),
        o.artifact.digest,
        o.startup_paths,
        human_bytes(o.startup_bytes)
    );
    let status = AcceleratedImageStatus {
        artifact: Some(o.artifact.clone()),
        plan_source: Some(PlanSource::Recorded),
        recorded_starts: starts,
        recording_attempt: Some(p.key.clone()),
        startup_paths: o.startup_paths,
        startup_bytes: o.startup_bytes,
        startup_size: Some(human_bytes(o.startup_bytes)),
        build_duration_seconds: Some((seconds * 1000.0).round() / 1000.0),
        last_error: None,
        conditions: vec![
            prev.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .unwrap_or_else(|| {
                    condition(&[], "Ready", true, "Built", "", img.metadata.generation)
                }),
            condition(
                &prev.conditions,
                "Recorded",
                true,
                "PlanRecorded",
                &msg,
                img.metadata.generation,
            ),
        ],
        ..prev
    };
    (status, Notice::normal("PlanRecorded", msg))
}

/// The status once the recorded build of `p` failed with `e`: the predicted artifact stays
/// pinned, and these records are not tried again.
pub fn recording_failed_status(
    img: &AcceleratedImage,
    p: &Pick,
    e: &str,
) -> (AcceleratedImageStatus, Notice) {
    let prev = img.status.clone().unwrap_or_default();
    let e = truncate(&format!("recorded plan: {e}"), 4096);
    let mut conditions: Vec<_> = prev
        .conditions
        .iter()
        .filter(|c| c.type_ != "Recorded")
        .cloned()
        .collect();
    conditions.push(condition(
        &prev.conditions,
        "Recorded",
        false,
        "RecordingFailed",
        &e,
        img.metadata.generation,
    ));
    let status = AcceleratedImageStatus {
        recording_attempt: Some(p.key.clone()),
        last_error: Some(e.clone()),
        conditions,
        ..prev
    };
    (status, Notice::warning("RecordingFailed", e))
}

/// Deletes records that will never be merged (bounded: nodes stop writing once a plan has
/// its starts, and a record that arrives after is dropped here).
pub async fn prune(ctx: &Context, names: &[String]) {
    let api: Api<StartupRecord> = Api::all(ctx.client.clone());
    for n in names {
        if let Err(e) = api.delete(n, &DeleteParams::default()).await {
            warn!(record = %n, error = %e, "deleting a surplus startup record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use talaria_api::{
        AcceleratedImageSpec, AccelerationPolicySpec, ArtifactRef, Recording, StartupRecordSpec,
    };

    fn now() -> Time {
        Time(Timestamp::now())
    }

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn policy(starts: u32, enabled: bool) -> Arc<AccelerationPolicy> {
        Arc::new(AccelerationPolicy::new(
            "p",
            AccelerationPolicySpec {
                images: vec!["r/a:1".into()],
                recording: Recording {
                    enabled: Some(enabled),
                    starts: Some(starts),
                    ..Default::default()
                },
                ..Default::default()
            },
        ))
    }

    fn art(d: &str) -> Option<ArtifactRef> {
        Some(ArtifactRef {
            repository: "r/a".into(),
            digest: d.into(),
            size: 1,
        })
    }

    fn image(status: AcceleratedImageStatus) -> AcceleratedImage {
        let mut img = AcceleratedImage::new(
            "img",
            AcceleratedImageSpec {
                image: "r/a".into(),
                digest: DIGEST.into(),
                platform: "linux/amd64".into(),
                profile: Profile::StartupLocalV1,
                acceleration_key: "k".into(),
                knobs: Default::default(),
                artifact_repository: None,
            },
        );
        img.status = Some(status);
        img
    }

    fn ready() -> AcceleratedImageStatus {
        AcceleratedImageStatus {
            phase: Phase::Ready,
            artifact: art("sha256:predicted"),
            default_artifact: art("sha256:default"),
            plan_source: Some(PlanSource::Predicted),
            ..Default::default()
        }
    }

    fn record(name: &str, secs: i64, image: &str, digest: &str) -> Arc<StartupRecord> {
        let mut r = StartupRecord::new(
            name,
            StartupRecordSpec {
                accelerated_image: image.into(),
                digest: digest.into(),
                node: "n1".into(),
                pod: Some("ns/p".into()),
                command: None,
                recorded_at: Time(Timestamp::from_second(1_700_000_000 + secs).unwrap()),
                files: 1,
                bytes: 1,
                trace: "x".into(),
            },
        );
        r.metadata.name = Some(name.into());
        Arc::new(r)
    }

    #[test]
    fn records_are_picked_until_the_plan_merges_its_starts() {
        let owners = [policy(2, true)];
        let recs = vec![
            record("c", 30, "img", DIGEST),
            record("a", 10, "img", DIGEST),
            record("b", 20, "img", DIGEST),
            // Another image, or a record claiming this image with another digest.
            record("x", 0, "other", DIGEST),
            record("y", 0, "img", "sha256:ff"),
        ];
        let p = pick(&image(ready()), &owners, &recs).unwrap();
        assert_eq!(p.key, "a,b", "the first two starts, by time");
        // Merged already: nothing to do, and the third record is surplus.
        let mut st = ready();
        st.plan_source = Some(PlanSource::Recorded);
        st.recorded_starts = ["b", "a"]
            .iter()
            .map(|n| RecordedStart {
                record: n.to_string(),
                node: "n1".into(),
                pod: None,
                recorded_at: now(),
            })
            .collect();
        assert!(pick(&image(st.clone()), &owners, &recs).is_none());
        assert_eq!(surplus(&image(st.clone()), &owners, &recs), vec!["c"]);
        // One start merged, a second came: merge both.
        st.recorded_starts.truncate(1);
        assert_eq!(pick(&image(st.clone()), &owners, &recs).unwrap().key, "a,b");
        assert!(surplus(&image(st), &owners, &recs).is_empty());
        // A failed attempt of these records is not repeated.
        let mut failed = ready();
        failed.recording_attempt = Some("a,b".into());
        assert!(pick(&image(failed), &owners, &recs).is_none());
        // Recording off, no records, not Ready, or no plan: nothing.
        assert!(pick(&image(ready()), &[policy(2, false)], &recs).is_none());
        assert!(pick(&image(ready()), &owners, &[]).is_none());
        let mut building = ready();
        building.phase = Phase::Building;
        assert!(pick(&image(building), &owners, &recs).is_none());
        let mut plain = image(ready());
        plain.spec.profile = Profile::Default;
        assert!(pick(&plain, &owners, &recs).is_none());
    }

    #[test]
    fn a_recorded_plan_is_pinned_with_its_starts_and_a_failure_keeps_the_prediction() {
        let recs = vec![record("a", 10, "img", DIGEST)];
        let img = image(ready());
        let p = pick(&img, &[policy(3, true)], &recs).unwrap();
        let o = BuildOutcome {
            artifact: art("sha256:recorded").unwrap(),
            default_artifact: art("sha256:default"),
            startup_paths: 12,
            startup_bytes: 3 << 20,
            ..Default::default()
        };
        let (st, n) = recorded_status(&img, &p, &o, 1.5);
        assert_eq!(st.artifact.unwrap().digest, "sha256:recorded");
        assert_eq!(st.default_artifact.unwrap().digest, "sha256:default");
        assert_eq!(st.plan_source, Some(PlanSource::Recorded));
        assert_eq!(st.recorded_starts[0].pod.as_deref(), Some("ns/p"));
        assert_eq!(st.startup_size.as_deref(), Some("3.0 MiB"));
        assert_eq!(st.phase, Phase::Ready);
        assert!(n.note.contains("ns/p on n1"), "{}", n.note);
        let (st, n) = recording_failed_status(&img, &p, "registry down");
        assert_eq!(st.artifact.unwrap().digest, "sha256:predicted");
        assert_eq!(st.recording_attempt.as_deref(), Some("a"));
        assert_eq!(
            st.last_error.as_deref(),
            Some("recorded plan: registry down")
        );
        assert!(n.warning);
    }

    #[test]
    fn undecodable_records_are_left_out() {
        let p = pick(
            &image(ready()),
            &[policy(3, true)],
            &[record("a", 10, "img", DIGEST)],
        )
        .unwrap();
        let traces: Vec<Result<String, String>> =
            p.records.iter().map(|r| Ok(r.spec.trace.clone())).collect();
        let (t, bad) = merged_trace(&p, &traces);
        assert_eq!(t.files(), 0);
        assert!(bad[0].starts_with("a: "), "{bad:?}");
    }

    #[test]
    fn sizes_read_as_humans_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(300 << 20), "300 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
