//! OCI data types shared by the registry client, the OCI layout and the artifact code.
//!
//! Our own small serde types rather than a full spec crate: they keep unknown media types
//! and fields harmless, use `u64` sizes and plain strings for platforms, and let us hash the
//! exact bytes we serialize.

pub mod layout;
pub mod registry;
pub mod store;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The OCI empty descriptor's content (`{}`) and digest.
pub const EMPTY_JSON: &[u8] = b"{}";
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Annotation of the OCI layout's index.json naming an entry's tag.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const CREATED: &str = "org.opencontainers.image.created";

/// All manifest media types we accept when pulling.
pub const MANIFEST_ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Upper bound on a manifest's size: registries commonly cap at 4 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|x| !x.is_empty())?;
        let architecture = it.next().filter(|x| !x.is_empty())?;
        let variant = it.next().map(str::to_string);
        if it.next().is_some() {
            return None;
        }
        Some(Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            os_version: None,
            variant,
        })
    }

    /// The platform of this machine (`linux/amd64`, `linux/arm64`, ...).
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            other => other,
        };
        Platform {
            architecture: arch.to_string(),
            os: "linux".to_string(),
            os_version: None,
            variant: None,
        }
    }

    /// Whether an index entry's platform satisfies this wanted platform. A wanted platform
    /// without a variant accepts any variant; `arm64` treats a missing variant as `v8`.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os || self.architecture != candidate.architecture {
            return false;
        }
        match (&self.variant, &candidate.variant) {
            (None, _) => true,
            (Some(w), Some(c)) => w == c,
            (Some(w), None) => self.architecture == "arm64" && w == "v8",
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: String, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            artifact_type: None,
            platform: None,
            annotations: None,
        }
    }

    /// Descriptor of some bytes (digest computed).
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, sha256_digest(bytes), bytes.len() as u64)
    }

    /// The OCI empty descriptor (`{}`).
    pub fn empty() -> Descriptor {
        Descriptor::new(OCI_EMPTY, EMPTY_DIGEST.to_string(), EMPTY_JSON.len() as u64)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_LIST
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ImageIndex {
    pub fn new_oci(manifests: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            artifact_type: None,
            manifests,
            subject: None,
            annotations: None,
        }
    }

    /// The image manifest this index offers for `platform` (the first that matches; a
    /// nested index is not one).
    pub fn manifest_for(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| !d.is_index() && d.platform.as_ref().is_some_and(|p| platform.matches(p)))
    }
}

/// A parsed manifest.
// Parsed once and consumed at once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// Errors about manifest and digest contents.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("invalid digest {0:?} (want sha256:<64 lower-case hex>)")]
    BadDigest(String),
    #[error("manifest {digest} ({media_type}): {source}")]
    Json {
        digest: String,
        media_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {digest}: unsupported media type {media_type}")]
    UnsupportedMediaType { digest: String, media_type: String },
}

/// A manifest as bytes (the bytes are what the digest covers) with its media type.
#[derive(Clone, Debug)]
pub struct RawManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

impl RawManifest {
    /// Wraps bytes; the media type is the given one, else the `mediaType` field, else
    /// guessed from the shape (an index has `manifests`).
    pub fn new(bytes: Bytes, media_type: Option<&str>) -> RawManifest {
        let digest = sha256_digest(&bytes);
        let media_type = media_type
            .filter(|m| MANIFEST_ACCEPT.contains(m))
            .map(str::to_string)
            .unwrap_or_else(|| sniff_media_type(&bytes));
        RawManifest {
            bytes,
            media_type,
            digest,
        }
    }

    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            &self.media_type,
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }

    pub fn parse(&self) -> Result<Manifest, FormatError> {
        let json = |source| FormatError::Json {
            digest: self.digest.clone(),
            media_type: self.media_type.clone(),
            source,
        };
        match self.media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => Ok(Manifest::Image(
                serde_json::from_slice(&self.bytes).map_err(json)?,
            )),
            OCI_INDEX | DOCKER_LIST => Ok(Manifest::Index(
                serde_json::from_slice(&self.bytes).map_err(json)?,
            )),
            other => Err(FormatError::UnsupportedMediaType {
                digest: self.digest.clone(),
                media_type: other.to_string(),
            }),
        }
    }
}

fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Sniff {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Sniff>(bytes) {
        Ok(Sniff {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Sniff {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    }
}

/// The `rootfs.diff_ids` of an image config: the digests of the layers' uncompressed tars,
/// in layer order. The config is fetched by the digest the manifest names, so they carry
/// the image digest's guarantee down to the uncompressed bytes.
pub fn config_diff_ids(raw: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    serde_json::from_slice::<Config>(raw).map(|c| c.rootfs.diff_ids)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Validates a digest and returns its hex part. Only sha256 is supported; the strict check
/// also makes digests safe to use as file names.
pub fn digest_hex(digest: &str) -> Result<&str, FormatError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(FormatError::BadDigest(digest.to_string())),
    }
}

/// The referrers tag-schema tag for a subject digest (`sha256-<hex>`).
pub fn referrers_tag(subject_digest: &str) -> Result<String, FormatError> {
    Ok(format!("sha256-{}", digest_hex(subject_digest)?))
}

/// Builds the referrer descriptor of an artifact manifest (what a referrers list holds).
pub fn referrer_descriptor(raw: &RawManifest, manifest: &ImageManifest) -> Descriptor {
    let mut d = raw.descriptor();
    d.artifact_type = manifest
        .artifact_type
        .clone()
        .or_else(|| Some(manifest.config.media_type.clone()));
    d.annotations = manifest.annotations.clone();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_is_right() {
        assert_eq!(sha256_digest(EMPTY_JSON), EMPTY_DIGEST);
    }

    #[test]
    fn digest_validation() {
        assert!(digest_hex(EMPTY_DIGEST).is_ok());
        assert!(digest_hex("sha256:../../etc/passwd").is_err());
        assert!(digest_hex(&EMPTY_DIGEST.to_uppercase()).is_err());
        assert!(digest_hex("sha512:00").is_err());
    }

    #[test]
    fn platform_matching() {
        let want = Platform::parse("linux/arm64/v8").unwrap();
        let mut c = Platform::parse("linux/arm64").unwrap();
        assert!(want.matches(&c));
        c.variant = Some("v9".into());
        assert!(!want.matches(&c));
        assert!(
            Platform::parse("linux/amd64")
                .unwrap()
                .matches(&Platform::parse("linux/amd64").unwrap())
        );
        assert!(
            !Platform::parse("linux/amd64")
                .unwrap()
                .matches(&Platform::parse("linux/arm64").unwrap())
        );
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("a/b/c/d").is_none());
    }

    #[test]
    fn sniffing() {
        let m = RawManifest::new(Bytes::from_static(br#"{"manifests":[]}"#), None);
        assert_eq!(m.media_type, OCI_INDEX);
        let m = RawManifest::new(
            Bytes::from_static(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#,
            ),
            Some("text/plain"),
        );
        assert_eq!(m.media_type, DOCKER_MANIFEST);
    }
}
