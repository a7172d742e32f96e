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
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Platform","type":"string","jsonPath":".spec.platform"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Startup-Bytes","type":"integer","jsonPath":".status.startupBytes"}"#,
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_are_cluster_scoped_with_status_and_short_names() {
        for crd in [AccelerationPolicy::crd(), AcceleratedImage::crd()] {
            assert_eq!(crd.spec.scope, "Cluster");
            assert_eq!(crd.spec.group, GROUP);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
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
