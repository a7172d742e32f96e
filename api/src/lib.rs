//! Talaria's Kubernetes API (`talaria.dev/v1alpha1`, both kinds cluster-scoped).
//!
//! - [`AccelerationPolicy`]: which images to accelerate and how; written by users.
//! - [`AcceleratedImage`]: one per (image manifest digest, platform, acceleration key); created
//!   by the controller, read by nodes. It is the trust anchor: a node only uses an artifact that
//!   an AcceleratedImage (so a policy) approved.
//!
//! Defaults and validation live in the schema (with CEL rules for cross-field checks) so the
//! apiserver rejects a malformed object with a clear message before any controller sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "talaria.dev";
pub const VERSION: &str = "v1alpha1";

/// The acceleration profile: what the artifact carries besides the layer indexes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Profile {
    /// Layer indexes plus a startup plan predicted from the image (files needed to start).
    #[default]
    #[serde(rename = "startup-local-v1")]
    StartupLocalV1,
    /// Layer indexes only: lazy loading without a startup plan.
    #[serde(rename = "default")]
    Default,
}

impl Profile {
    pub fn as_str(&self) -> &'static str {
        match self {
            Profile::StartupLocalV1 => "startup-local-v1",
            Profile::Default => "default",
        }
    }
}

/// Which images a policy selects. A pod's image is selected when it matches one of `images`
/// and the pod matches both selectors (an absent selector matches everything).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSelector {
    /// Image reference patterns, globs on `registry/repository:tag` (`*` within a path
    /// segment, `**` across segments), e.g. `registry.example.com/ml/**`, `docker.io/library/postgres:16*`.
    #[serde(default)]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(p, size(p) > 0 && size(p) <= 512)").message("image patterns must be non-empty and at most 512 characters"))]
    pub images: Vec<String>,
    /// Namespaces whose pods are considered; all namespaces when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods considered, by label; all pods when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Tuning knobs. They are part of the acceleration key, so changing one builds new artifacts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Knobs {
    /// Uncompressed bytes between decompression checkpoints (the unit of lazy fetching).
    /// 64 KiB to 64 MiB; 4 MiB when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 65536, max = 67108864))]
    pub span_size: Option<u64>,
    /// Most bytes the startup plan asks a node to prefetch first; 256 MiB when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 68719476736_u64))]
    pub prefetch_budget: Option<u64>,
    /// Layers smaller than this many compressed bytes are not indexed and are pulled
    /// normally; 0 (index all) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub skip_layers_smaller_than: Option<u64>,
}

/// Learning from real starts: nodes record what the first starts of an image read, the
/// controller merges those records and pins a recorded plan and startup pack in place of
/// the predicted one. Not part of the acceleration key: a recorded plan replaces the
/// predicted one in the same AcceleratedImage. With several owning policies, recording is on
/// when any owner has it on and the largest window, starts and bytes win.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recording {
    /// Record starts and build recorded plans; on when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Reads within this many seconds after an image's first layer is prepared on a node
    /// count as its start; 60 when absent (a node's own `--record-startup-window` caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 600))]
    pub window_seconds: Option<u32>,
    /// Starts merged into the recorded plan (each one rebuilds it); 3 when absent. A byte
    /// range is kept when at least half of the starts with the same command read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub starts: Option<u32>,
    /// Most bytes a recorded plan and its pack carry (the prefetch budget bounds only a
    /// predicted plan); 1 GiB when absent. The controller holds a pack in memory while
    /// building it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 8589934592_u64))]
    pub max_bytes: Option<u64>,
}

/// [`Recording`] with its defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordingSettings {
    pub enabled: bool,
    pub window_seconds: u32,
    pub starts: u32,
    pub max_bytes: u64,
}

impl RecordingSettings {
    pub const DEFAULT_WINDOW_SECONDS: u32 = 60;
    pub const DEFAULT_STARTS: u32 = 3;
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

    /// The settings of an image owned by `policies` (see [`Recording`]); off without owners.
    pub fn of<'a>(policies: impl IntoIterator<Item = &'a AccelerationPolicy>) -> RecordingSettings {
        let mut out = RecordingSettings {
            enabled: false,
            window_seconds: 0,
            starts: 0,
            max_bytes: 0,
        };
        for p in policies {
            let r = &p.spec.recording;
            if !r.enabled.unwrap_or(true) || p.spec.profile == Profile::Default {
                continue;
            }
            out.enabled = true;
            out.window_seconds = out
                .window_seconds
                .max(r.window_seconds.unwrap_or(Self::DEFAULT_WINDOW_SECONDS));
            out.starts = out.starts.max(r.starts.unwrap_or(Self::DEFAULT_STARTS));
            out.max_bytes = out
                .max_bytes
                .max(r.max_bytes.unwrap_or(Self::DEFAULT_MAX_BYTES));
        }
        out
    }
}

/// A reference to a `kubernetes.io/dockerconfigjson` secret with registry credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// AccelerationPolicy: which images to accelerate and how.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "talaria.dev",
    version = "v1alpha1",
    kind = "AccelerationPolicy",
    shortname = "accpol",
    category = "talaria",
    status = "AccelerationPolicyStatus",
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Images","type":"integer","jsonPath":".status.images"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("size(self.selector.images) > 0 || size(self.images) > 0").message("select images with selector.images or list them in images"))]
#[serde(rename_all = "camelCase")]
pub struct AccelerationPolicySpec {
    /// Which running (or scheduled) pods' images to accelerate.
    #[serde(default)]
    pub selector: ImageSelector,
    /// Images to accelerate even when no pod runs them yet (full references, tag or digest).
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub images: Vec<String>,
    /// `startup-local-v1` (indexes + startup plan) or `default` (indexes only).
    #[serde(default)]
    pub profile: Profile,
    /// Platforms to build for, `os/arch[/variant]`; `linux/amd64` when empty.
    #[serde(default)]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$'))").message("platforms look like linux/amd64 or linux/arm64/v8"))]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub knobs: Knobs,
    /// Secrets with registry credentials, used with the pods' imagePullSecrets.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub registry_credentials: Vec<SecretRef>,
    /// Store artifacts in this repository (`registry/repository`) instead of the image's own,
    /// for registries that cannot be written (public images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub artifact_repository: Option<String>,
    /// Stop building new artifacts for this policy; existing ones stay usable.
    #[serde(default)]
    pub paused: bool,
    /// Learning from real starts (recorded plans); on by default.
    #[serde(default)]
    pub recording: Recording,
}

/// Observed state of an AccelerationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccelerationPolicyStatus {
    /// Ready, Progressing, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// AcceleratedImages this policy selects.
    #[serde(default)]
    pub images: u32,
    #[serde(default)]
    pub ready: u32,
    #[serde(default)]
    pub building: u32,
    #[serde(default)]
    pub failed: u32,
}

/// AcceleratedImage: one image digest + platform + acceleration key; written once by the controller.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "talaria.dev",
    version = "v1alpha1",
    kind = "AcceleratedImage",
    shortname = "accimg",
    category = "talaria",
    status = "AcceleratedImageStatus",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".status.reference"}"#,
    printcolumn = r#"{"name":"Platform","type":"string","jsonPath":".spec.platform"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Plan","type":"string","jsonPath":".status.planSource"}"#,
    printcolumn = r#"{"name":"Startup","type":"string","jsonPath":".status.startupSize"}"#,
    printcolumn = r#"{"name":"Last-Error","type":"string","jsonPath":".status.lastError"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AcceleratedImageSpec {
    /// The image repository, `registry/repository` (no tag).
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("image is immutable"))]
    pub image: String,
    /// The platform-specific image manifest digest, `sha256:<hex>`.
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("digest is immutable"))]
    pub digest: String,
    /// `os/arch[/variant]`.
    #[schemars(length(min = 1, max = 64))]
    pub platform: String,
    pub profile: Profile,
    /// Profile + version + hash of the knobs; see docs/artifact-format.md.
    #[schemars(length(min = 1, max = 128))]
    pub acceleration_key: String,
    #[serde(default)]
    pub knobs: Knobs,
    /// Where the artifact is stored when not in the image's repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_repository: Option<String>,
}

/// Build phase of an AcceleratedImage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Building,
    Ready,
    Failed,
}

/// Where the startup plan of the pinned artifact comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PlanSource {
    /// Predicted from the image alone (the first start of an image).
    #[default]
    Predicted,
    /// From the reads of real starts (StartupRecords).
    Recorded,
    /// No plan: the profile carries indexes only.
    None,
}

/// A recorded start merged into the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedStart {
    /// The StartupRecord it came from.
    pub record: String,
    pub node: String,
    /// `namespace/name` of the pod(s) that started, when the node knew them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub recorded_at: Time,
}

/// An OCI descriptor of a stored artifact.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRef {
    /// `registry/repository` holding the artifact manifest.
    pub repository: String,
    /// Digest of the artifact manifest.
    pub digest: String,
    /// Size of the artifact manifest in bytes.
    pub size: i64,
}

/// Observed state of an AcceleratedImage: the artifacts a node may use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceleratedImageStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The image as pods name it, with tag and short digest (`registry/repo:tag@sha256:0123456789ab`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Where the pinned artifact's startup plan comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_source: Option<PlanSource>,
    /// The starts the recorded plan merges (empty for a predicted plan).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub recorded_starts: Vec<RecordedStart>,
    /// The StartupRecords of the last recorded build attempt, sorted and comma-separated: a
    /// failed one is not retried until another record comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_attempt: Option<String>,
    /// `startupBytes` in human units (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_size: Option<String>,
    /// The artifact for this image's profile (accelerated when the profile has a plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
    /// The default artifact (indexes only), the node's fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_artifact: Option<ArtifactRef>,
    #[serde(default)]
    pub startup_paths: u32,
    #[serde(default)]
    pub startup_bytes: u64,
    #[serde(default)]
    pub layers_indexed: u32,
    #[serde(default)]
    pub layers_skipped: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_duration_seconds: Option<f64>,
    /// Build attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// When the last build attempt started; with `attempts` it sets the retry backoff, also
    /// across controller restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The owning policies when the last attempt started, `uid=generation` pairs, sorted and
    /// comma-separated. When they differ from the current owners (a policy changed, or one was
    /// added), a Failed image is retried at once with its backoff reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_generations: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// StartupRecord: what one start of an image read on one node, written by that node's agent
/// for the controller to build a recorded plan from. A hint, not a trust anchor: it can
/// change which bytes of the image are prefetched and packed (the controller packs them from
/// the image's own layers), never what a file contains; it is bounded by this schema and by
/// the trace decoder's caps (docs/learning.md).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "talaria.dev",
    version = "v1alpha1",
    kind = "StartupRecord",
    shortname = "strec",
    category = "talaria",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.acceleratedImage"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".spec.files"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a StartupRecord is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct StartupRecordSpec {
    /// The AcceleratedImage whose start was recorded.
    #[schemars(length(min = 1, max = 253))]
    pub accelerated_image: String,
    /// The image manifest digest (the AcceleratedImage's).
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    pub digest: String,
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// `namespace/name` of the pod(s) that started the image (comma-separated), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub pod: Option<String>,
    /// Hash of the container's command and args when the pod sets them (absent: the image's
    /// own entrypoint). Starts are merged per command, then united.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub command: Option<String>,
    pub recorded_at: Time,
    /// Files and bytes the trace names (a summary; the controller counts again).
    #[serde(default)]
    pub files: u32,
    #[serde(default)]
    pub bytes: u64,
    /// The trace: JSON compressed with zstd, in base64 (at most 1 MiB of compressed data).
    #[schemars(length(min = 1, max = 1398104))]
    pub trace: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_are_cluster_scoped_with_status_and_short_names() {
        for crd in [
            AccelerationPolicy::crd(),
            AcceleratedImage::crd(),
            StartupRecord::crd(),
        ] {
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(crd.spec.group, GROUP);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert_eq!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                crd.spec.names.kind != "StartupRecord"
            );
            assert!(
                crd.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| !s.is_empty())
            );
        }
    }

    #[test]
    fn policy_schema_has_cel_rule_and_profile_enum() {
        let json = serde_json::to_string(&AccelerationPolicy::crd()).unwrap();
        assert!(json.contains("x-kubernetes-validations"), "{json}");
        assert!(json.contains("startup-local-v1"));
    }

    #[test]
    fn profile_defaults_to_startup_local() {
        let spec: AccelerationPolicySpec =
            serde_json::from_value(serde_json::json!({"images": ["a/b:c"]})).unwrap();
        assert_eq!(spec.profile, Profile::StartupLocalV1);
        assert!(!spec.paused);
    }
}

#[cfg(test)]
mod recording_tests {
    use super::*;

    fn policy(recording: Recording, profile: Profile) -> AccelerationPolicy {
        AccelerationPolicy::new(
            "p",
            AccelerationPolicySpec {
                images: vec!["a/b:c".into()],
                profile,
                recording,
                ..Default::default()
            },
        )
    }

    #[test]
    fn recording_is_on_by_default_and_owners_combine() {
        let on = policy(Recording::default(), Profile::StartupLocalV1);
        let s = RecordingSettings::of([&on]);
        assert_eq!(
            s,
            RecordingSettings {
                enabled: true,
                window_seconds: 60,
                starts: 3,
                max_bytes: 1 << 30
            }
        );
        let off = policy(
            Recording {
                enabled: Some(false),
                ..Default::default()
            },
            Profile::StartupLocalV1,
        );
        assert!(!RecordingSettings::of([&off]).enabled);
        // No plan to record into.
        assert!(!RecordingSettings::of([&policy(Recording::default(), Profile::Default)]).enabled);
        let long = policy(
            Recording {
                window_seconds: Some(300),
                starts: Some(1),
                ..Default::default()
            },
            Profile::StartupLocalV1,
        );
        let s = RecordingSettings::of([&off, &long, &on]);
        assert_eq!((s.enabled, s.window_seconds, s.starts), (true, 300, 3));
        assert!(!RecordingSettings::of([]).enabled);
    }
}
