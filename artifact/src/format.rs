//! The Talaria artifact: an OCI image manifest that refers to an image manifest (`subject`)
//! and carries one layer index blob per indexed layer, plus a startup plan blob for an
//! accelerated profile. See `docs/artifact-format.md` for the media types and annotations.
//!
//! Artifact manifests are deterministic (no wall-clock timestamp unless the caller asks
//! for one): two builds of one image with one key produce the same digest, so concurrent
//! builds converge on one artifact.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::index::{INDEX_MEDIA_TYPE, WINDOWS_MEDIA_TYPE};
use crate::oci::store::StoreError;
use crate::oci::{self, Descriptor, ImageManifest, Manifest, RawManifest};

pub const ARTIFACT_TYPE: &str = "application/vnd.talaria.artifact.v1";
pub const STARTUP_PLAN_MEDIA_TYPE: &str = "application/vnd.talaria.startup-plan.v1+json";

pub const ANN_PROFILE: &str = "dev.talaria.profile";
pub const ANN_PROFILE_VERSION: &str = "dev.talaria.profile-version";
pub const ANN_KEY: &str = "dev.talaria.acceleration-key";
pub const ANN_STARTUP_PATHS: &str = "dev.talaria.startup-paths";
/// JSON array of the image layer digests the artifact does not index (pulled normally).
/// `recorded` when the plan was built from a node's trace of a real start rather than
/// predicted by the analyzer; such a plan wins over a predicted one of the same key
/// whatever their `created` stamps (which have whole seconds only).
pub const ANN_PLAN_SOURCE: &str = "dev.talaria.plan-source";
/// Value of [`ANN_PLAN_SOURCE`] for a recorded plan.
pub const PLAN_SOURCE_RECORDED: &str = "recorded";
pub const ANN_SKIPPED_LAYERS: &str = "dev.talaria.skipped-layers";
/// On an index blob descriptor: the digest of the image layer it indexes.
pub const ANN_LAYER_DIGEST: &str = "dev.talaria.layer.digest";
/// On an index blob descriptor: the layer's position in the image manifest.
pub const ANN_LAYER_INDEX: &str = "dev.talaria.layer.index";

/// Largest index or plan blob we read into memory.
pub const MAX_INDEX_BLOB: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {digest}: {message}")]
    Invalid { digest: String, message: String },
    #[error("unknown profile {0:?} (known: default, startup-local-v1)")]
    UnknownProfile(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An acceleration profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Layer indexes only.
    Default,
    /// Indexes plus a startup plan of the files the image needs to start.
    StartupLocalV1,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::StartupLocalV1 => "startup-local-v1",
        }
    }

    /// The profile's format version this build writes and understands.
    pub fn version(self) -> u32 {
        1
    }

    pub fn parse(s: &str) -> Result<Profile, ArtifactError> {
        match s {
            "default" => Ok(Profile::Default),
            "startup-local-v1" => Ok(Profile::StartupLocalV1),
            other => Err(ArtifactError::UnknownProfile(other.to_string())),
        }
    }

    /// Whether this build understands artifacts of `name` at `version`.
    pub fn understood(name: &str, version: u32) -> Option<Profile> {
        Profile::parse(name).ok().filter(|p| p.version() == version)
    }

    pub fn has_plan(self) -> bool {
        matches!(self, Profile::StartupLocalV1)
    }
}

/// The knobs that shape an artifact; their hash is part of the acceleration key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knobs {
    /// Uncompressed bytes per span (checkpoint interval).
    pub span_size: u64,
    /// Bytes of startup data a node prefetches first.
    pub prefetch_budget: u64,
    /// Layers smaller than this (compressed) are not indexed; 0 indexes all.
    pub skip_threshold: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            span_size: 4 << 20,
            prefetch_budget: 256 << 20,
            skip_threshold: 0,
        }
    }
}

/// `<profile>-v<version>-<12 hex of sha256(canonical JSON of the knobs)>`.
pub fn acceleration_key(profile: Profile, knobs: &Knobs) -> String {
    // Canonical JSON: fixed key order (sorted), no whitespace, integers only.
    let canonical = format!(
        r#"{{"prefetch_budget":{},"skip_threshold":{},"span_size":{}}}"#,
        knobs.prefetch_budget, knobs.skip_threshold, knobs.span_size
    );
    let h = hex::encode(Sha256::digest(canonical.as_bytes()));
    format!("{}-v{}-{}", profile.name(), profile.version(), &h[..12])
}

/// One index blob of an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedLayer {
    /// Digest of the image layer.
    pub layer_digest: String,
    /// The index blob.
    pub index: Descriptor,
    /// The index's windows blob (version 2 indexes keep their windows there).
    pub windows: Option<Descriptor>,
}

/// A parsed artifact manifest.
#[derive(Clone, Debug)]
pub struct ArtifactInfo {
    /// The artifact manifest's descriptor.
    pub descriptor: Descriptor,
    pub subject: Descriptor,
    pub profile: String,
    pub profile_version: u32,
    pub key: String,
    pub created: Option<String>,
    pub layers: Vec<IndexedLayer>,
    pub skipped: Vec<String>,
    pub plan: Option<Descriptor>,
    /// The plan comes from a recorded start ([`ANN_PLAN_SOURCE`]).
    pub plan_recorded: bool,
    /// The startup pack blob ([`crate::startup::pack`]), listed so that it is copied and
    /// kept with the artifact.
    pub pack: Option<Descriptor>,
    pub startup_paths: Vec<String>,
}

impl ArtifactInfo {
    /// The index blob for an image layer (`None`: not indexed, pull it normally).
    pub fn index_for(&self, layer_digest: &str) -> Option<&Descriptor> {
        self.layers
            .iter()
            .find(|l| l.layer_digest == layer_digest)
            .map(|l| &l.index)
    }

    pub fn is_accelerated(&self) -> bool {
        self.plan.is_some()
    }
}

/// Inputs of an artifact manifest.
pub struct ArtifactSpec<'a> {
    pub subject: Descriptor,
    pub profile: Profile,
    pub knobs: &'a Knobs,
    pub layers: Vec<IndexedLayer>,
    pub skipped: Vec<String>,
    pub plan: Option<Descriptor>,
    pub startup_paths: Vec<String>,
    /// The plan was recorded, not predicted (stamped as [`ANN_PLAN_SOURCE`]).
    pub plan_recorded: bool,
    /// The startup pack blob the plan's table describes.
    pub pack: Option<Descriptor>,
    /// `org.opencontainers.image.created`; `None` keeps the manifest deterministic.
    pub created: Option<String>,
}

/// Builds the artifact manifest bytes.
pub fn build_manifest(spec: ArtifactSpec<'_>) -> Result<RawManifest, ArtifactError> {
    let mut ann = BTreeMap::new();
    ann.insert(ANN_PROFILE.to_string(), spec.profile.name().to_string());
    ann.insert(
        ANN_PROFILE_VERSION.to_string(),
        spec.profile.version().to_string(),
    );
    ann.insert(
        ANN_KEY.to_string(),
        acceleration_key(spec.profile, spec.knobs),
    );
    let to_json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    ann.insert(ANN_STARTUP_PATHS.to_string(), to_json(&spec.startup_paths));
    if !spec.skipped.is_empty() {
        ann.insert(ANN_SKIPPED_LAYERS.to_string(), to_json(&spec.skipped));
    }
    if let Some(c) = &spec.created {
        ann.insert(oci::CREATED.to_string(), c.clone());
    }
    if spec.plan_recorded && spec.plan.is_some() {
        ann.insert(
            ANN_PLAN_SOURCE.to_string(),
            PLAN_SOURCE_RECORDED.to_string(),
        );
    }
    let mut layers: Vec<Descriptor> = spec
        .layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            let mut a = BTreeMap::new();
            a.insert(ANN_LAYER_DIGEST.to_string(), l.layer_digest.clone());
            a.insert(ANN_LAYER_INDEX.to_string(), i.to_string());
            let mut d = Descriptor::new(INDEX_MEDIA_TYPE, l.index.digest.clone(), l.index.size);
            d.annotations = Some(a.clone());
            // Listed so registries keep it and copies carry it; nodes find it by the
            // digest the index records.
            let w = l.windows.as_ref().map(|w| {
                let mut w = Descriptor::new(WINDOWS_MEDIA_TYPE, w.digest.clone(), w.size);
                w.annotations = Some(a);
                w
            });
            std::iter::once(d).chain(w)
        })
        .collect();
    if let Some(p) = &spec.plan {
        layers.push(Descriptor::new(
            STARTUP_PLAN_MEDIA_TYPE,
            p.digest.clone(),
            p.size,
        ));
    }
    if let Some(p) = &spec.pack {
        layers.push(Descriptor::new(&p.media_type, p.digest.clone(), p.size));
    }
    let mut subject = spec.subject.clone();
    subject.annotations = None;
    subject.platform = None;
    subject.artifact_type = None;
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.to_string()),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        config: Descriptor::empty(),
        layers,
        subject: Some(subject),
        annotations: Some(ann),
    };
    let bytes = serde_json::to_vec(&m).map_err(|e| ArtifactError::Invalid {
        digest: "(new)".into(),
        message: format!("serializing: {e}"),
    })?;
    Ok(RawManifest::new(
        Bytes::from(bytes),
        Some(oci::OCI_MANIFEST),
    ))
}

/// Parses an artifact manifest; errors for manifests that are not Talaria artifacts.
pub fn parse_artifact(raw: &RawManifest) -> Result<ArtifactInfo, ArtifactError> {
    let invalid = |message: String| ArtifactError::Invalid {
        digest: raw.digest.clone(),
        message,
    };
    let m = match raw.parse().map_err(|e| invalid(e.to_string()))? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => return Err(invalid("an index, not an artifact manifest".into())),
    };
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(invalid(format!(
            "artifactType {:?} is not {ARTIFACT_TYPE}",
            m.artifact_type
        )));
    }
    let subject = m
        .subject
        .clone()
        .ok_or_else(|| invalid("no subject".into()))?;
    let ann = m.annotations.clone().unwrap_or_default();
    let get = |k: &str| ann.get(k).cloned();
    let profile = get(ANN_PROFILE).ok_or_else(|| invalid(format!("no {ANN_PROFILE}")))?;
    let profile_version = get(ANN_PROFILE_VERSION)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid(format!("no numeric {ANN_PROFILE_VERSION}")))?;
    let key = get(ANN_KEY).ok_or_else(|| invalid(format!("no {ANN_KEY}")))?;
    let list = |k: &str| -> Result<Vec<String>, ArtifactError> {
        match ann.get(k) {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_str(v).map_err(|e| invalid(format!("{k}: {e}"))),
        }
    };
    let startup_paths = list(ANN_STARTUP_PATHS)?;
    let skipped = list(ANN_SKIPPED_LAYERS)?;
    let mut layers = Vec::new();
    let mut plan = None;
    let mut pack = None;
    let mut windows = Vec::new();
    for l in &m.layers {
        oci::digest_hex(&l.digest).map_err(|e| invalid(e.to_string()))?;
        match l.media_type.as_str() {
            INDEX_MEDIA_TYPE => {
                let ld = l.annotation(ANN_LAYER_DIGEST).ok_or_else(|| {
                    invalid(format!("index {} without {ANN_LAYER_DIGEST}", l.digest))
                })?;
                let mut d = l.clone();
                d.annotations = None;
                layers.push(IndexedLayer {
                    layer_digest: ld.to_string(),
                    index: d,
                    windows: None,
                });
            }
            WINDOWS_MEDIA_TYPE => windows.push(l.clone()),
            STARTUP_PLAN_MEDIA_TYPE => plan = Some(l.clone()),
            crate::startup::pack::PACK_MEDIA_TYPE | crate::startup::pack::PACK_ZSTD_MEDIA_TYPE => {
                pack = Some(l.clone())
            }
            // Unknown blob kinds from newer versions are ignored.
            _ => {}
        }
    }
    for w in windows {
        let ld = w.annotation(ANN_LAYER_DIGEST).map(str::to_string);
        if let Some(l) = layers
            .iter_mut()
            .find(|l| Some(&l.layer_digest) == ld.as_ref() && l.windows.is_none())
        {
            let mut w = w;
            w.annotations = None;
            l.windows = Some(w);
        }
    }
    Ok(ArtifactInfo {
        descriptor: raw.descriptor(),
        subject,
        profile,
        profile_version,
        key,
        created: get(oci::CREATED),
        plan_recorded: plan.is_some()
            && ann.get(ANN_PLAN_SOURCE).map(String::as_str) == Some(PLAN_SOURCE_RECORDED),
        pack,
        layers,
        skipped,
        plan,
        startup_paths,
    })
}

/// Orders candidates by preference: accelerated artifacts with a profile version this build
/// understands (a recorded plan before a predicted one), then default ones, newest first (`org.opencontainers.image.created`, RFC
/// 3339 strings compare in time order), then by digest for a stable choice. Artifacts of
/// unknown profiles or versions are dropped.
pub fn rank(mut candidates: Vec<ArtifactInfo>) -> Vec<ArtifactInfo> {
    candidates.retain(|a| Profile::understood(&a.profile, a.profile_version).is_some());
    candidates.sort_by(|a, b| {
        let tier = |x: &ArtifactInfo| match Profile::understood(&x.profile, x.profile_version) {
            Some(p) if p.has_plan() && x.plan.is_some() => usize::from(!x.plan_recorded),
            _ => 2,
        };
        tier(a)
            .cmp(&tier(b))
            .then_with(|| b.created.cmp(&a.created))
            .then_with(|| a.descriptor.digest.cmp(&b.descriptor.digest))
    });
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(profile: Profile, plan: bool, created: Option<&str>, d: &str) -> ArtifactInfo {
        ArtifactInfo {
            descriptor: Descriptor::new(oci::OCI_MANIFEST, d.into(), 1),
            subject: Descriptor::empty(),
            profile: profile.name().into(),
            profile_version: 1,
            key: acceleration_key(profile, &Knobs::default()),
            created: created.map(str::to_string),
            layers: vec![],
            skipped: vec![],
            plan: plan.then(Descriptor::empty),
            plan_recorded: false,
            pack: None,
            startup_paths: vec![],
        }
    }

    #[test]
    fn key_depends_on_knobs_and_profile() {
        let k = Knobs::default();
        let a = acceleration_key(Profile::Default, &k);
        assert!(a.starts_with("default-v1-"));
        assert_eq!(a.len(), "default-v1-".len() + 12);
        assert_eq!(a, acceleration_key(Profile::Default, &k.clone()));
        let k2 = Knobs {
            span_size: 1 << 20,
            ..k.clone()
        };
        assert_ne!(a, acceleration_key(Profile::Default, &k2));
        assert_ne!(a, acceleration_key(Profile::StartupLocalV1, &k));
    }

    #[test]
    fn ranking_prefers_accelerated_then_newest() {
        let mut unknown = info(Profile::Default, false, None, "d0");
        unknown.profile_version = 99;
        let v = rank(vec![
            info(Profile::Default, false, Some("2025-01-02T00:00:00Z"), "d1"),
            unknown,
            info(
                Profile::StartupLocalV1,
                true,
                Some("2025-01-01T00:00:00Z"),
                "d2",
            ),
            info(
                Profile::StartupLocalV1,
                true,
                Some("2025-01-03T00:00:00Z"),
                "d3",
            ),
        ]);
        let order: Vec<_> = v.iter().map(|a| a.descriptor.digest.as_str()).collect();
        assert_eq!(order, ["d3", "d2", "d1"]);

        // A recorded plan wins over a predicted one stamped the same second or later.
        let mut recorded = info(
            Profile::StartupLocalV1,
            true,
            Some("2025-01-01T00:00:00Z"),
            "d9",
        );
        recorded.plan_recorded = true;
        let predicted = info(
            Profile::StartupLocalV1,
            true,
            Some("2025-01-01T00:00:00Z"),
            "d4",
        );
        let v = rank(vec![predicted, recorded]);
        assert_eq!(v[0].descriptor.digest, "d9");
    }

    #[test]
    fn manifest_round_trip() {
        let subject = Descriptor::of(oci::OCI_MANIFEST, b"image");
        let idx = Descriptor::of(INDEX_MEDIA_TYPE, b"index");
        let win = Descriptor::of(WINDOWS_MEDIA_TYPE, b"windows");
        let plan = Descriptor::of(STARTUP_PLAN_MEDIA_TYPE, b"{}");
        let knobs = Knobs::default();
        let spec = || ArtifactSpec {
            subject: subject.clone(),
            profile: Profile::StartupLocalV1,
            knobs: &knobs,
            layers: vec![
                IndexedLayer {
                    layer_digest: oci::EMPTY_DIGEST.into(),
                    index: idx.clone(),
                    windows: Some(win.clone()),
                },
                IndexedLayer {
                    layer_digest: "sha256:inline".into(),
                    index: idx.clone(),
                    windows: None,
                },
            ],
            skipped: vec!["sha256:skipped".into()],
            plan: Some(plan.clone()),
            startup_paths: vec!["/bin/sh".into()],
            plan_recorded: false,
            pack: None,
            created: None,
        };
        let raw = build_manifest(spec()).unwrap();
        // Deterministic: the same inputs give the same digest.
        assert_eq!(raw.digest, build_manifest(spec()).unwrap().digest);
        let a = parse_artifact(&raw).unwrap();
        assert_eq!(a.subject.digest, subject.digest);
        assert_eq!(a.profile, "startup-local-v1");
        assert_eq!(a.key, acceleration_key(Profile::StartupLocalV1, &knobs));
        assert_eq!(a.index_for(oci::EMPTY_DIGEST), Some(&idx));
        // Each windows blob goes back to its own layer's index.
        assert_eq!(a.layers[0].windows, Some(win.clone()));
        assert_eq!(a.layers[1].windows, None);
        assert_eq!(a.plan, Some(plan.clone()));
        assert_eq!(a.skipped, vec!["sha256:skipped".to_string()]);
        assert_eq!(a.startup_paths, vec!["/bin/sh".to_string()]);
        assert!(!a.plan_recorded);
        let mut recorded = spec();
        recorded.plan_recorded = true;
        let r = parse_artifact(&build_manifest(recorded).unwrap()).unwrap();
        assert!(r.plan_recorded, "the plan source survives the round trip");
        assert_ne!(r.descriptor.digest, a.descriptor.digest);
        // A foreign manifest is rejected, not misread.
        let foreign = RawManifest::new(
            Bytes::from_static(br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:0","size":0},"layers":[]}"#),
            None,
        );
        assert!(parse_artifact(&foreign).is_err());
    }
}
