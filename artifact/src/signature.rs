//! Cosign-compatible signatures of artifacts, with key pairs (no transparency log): the
//! second way, after the cluster's pin, for a node to trust an artifact (docs/trust.md).
//!
//! The format is cosign's "simple signing": the payload is
//! `{"critical":{"identity":{"docker-reference":…},"image":{"docker-manifest-digest":…},
//! "type":"cosign container image signature"},"optional":null}`, signed with ECDSA P-256 over
//! SHA-256 (ASN.1 DER, base64 in the layer annotation `dev.cosignproject.cosign/signature`).
//! It is stored where `cosign verify` looks, the tag `sha256-<hex>.sig` in the signed
//! manifest's repository, and that signature manifest also names the artifact as its
//! `subject`, so it is a referrer of the artifact too. `cosign verify --key key.pub
//! --insecure-ignore-tlog <repo>@<artifact digest>` accepts it.
//!
//! Keys: a private key is PKCS#8 PEM (`openssl genpkey -algorithm EC -pkeyopt
//! ec_paramgen_curve:P-256`, or `talaria keygen`); public keys are SubjectPublicKeyInfo PEM
//! (`PUBLIC KEY`), what `cosign public-key` and `openssl pkey -pubout` print. Cosign's own
//! encrypted key files are not read: export the public key with `cosign public-key`.
//!
//! Why not the sigstore crate: its signing side pulls in the Fulcio, Rekor and OIDC clients
//! and a second TLS crypto back end (aws-lc-rs) next to the ring that rustls and kube use
//! here; key-pair ECDSA over a fixed JSON payload needs only ring, already linked.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::json;

use crate::oci::store::{Store, StoreError};
use crate::oci::{self, Descriptor, ImageManifest, Manifest, RawManifest};

/// Media type of the signed payload.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Annotation of a payload layer carrying its base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `artifactType` of a signature manifest found as a referrer.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Payloads are a few hundred bytes; more is not one.
const MAX_PAYLOAD: u64 = 64 << 10;
/// Signatures looked at per signed manifest (a flood is not read to its end).
const MAX_SIGNATURES: usize = 16;
/// DER prefix of a P-256 SubjectPublicKeyInfo: SEQUENCE { AlgorithmIdentifier { ecPublicKey,
/// prime256v1 }, BIT STRING { 0 unused bits, the 65-byte uncompressed point } }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("key: {0}")]
    Key(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{digest} is not signed by a trusted key")]
    NotSigned { digest: String },
    #[error("signature manifest of {digest}: {message}")]
    Format { digest: String, message: String },
}

impl SignatureError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Key(_) => "key",
            SignatureError::Store(_) => "registry",
            SignatureError::NotSigned { .. } => "not_signed",
            SignatureError::Format { .. } => "format",
        }
    }
}

/// The DER bodies of the PEM blocks labelled `label` in `text`.
fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, SignatureError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&begin) {
        let body = &rest[i + begin.len()..];
        let j = body
            .find(&end)
            .ok_or_else(|| SignatureError::Key(format!("{begin} without {end}")))?;
        let b64: String = body[..j].split_whitespace().collect();
        out.push(
            B64.decode(b64)
                .map_err(|e| SignatureError::Key(format!("{label}: {e}")))?,
        );
        rest = &body[j + end.len()..];
    }
    Ok(out)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn spki_pem(point: &[u8]) -> String {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(point);
    pem("PUBLIC KEY", &der)
}

/// An ECDSA P-256 private key that signs artifacts.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from PKCS#8 PEM (`PRIVATE KEY`).
    pub fn from_pem(text: &str) -> Result<SigningKey, SignatureError> {
        let der = pem_blocks(text, "PRIVATE KEY")?
            .into_iter()
            .next()
            .ok_or_else(|| SignatureError::Key("no PKCS#8 PRIVATE KEY block".into()))?;
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|e| SignatureError::Key(format!("not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(SigningKey { pair, rng })
    }

    /// A new key pair: (private key PEM, public key PEM).
    pub fn generate() -> Result<(String, String), SignatureError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|e| SignatureError::Key(format!("generating: {e}")))?;
        let private = pem("PRIVATE KEY", doc.as_ref());
        let public = SigningKey::from_pem(&private)?.public_pem();
        Ok((private, public))
    }

    /// The public key, as SubjectPublicKeyInfo PEM.
    pub fn public_pem(&self) -> String {
        spki_pem(self.pair.public_key().as_ref())
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignatureError> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| SignatureError::Key(format!("signing: {e}")))
    }
}

/// Public keys whose signatures are trusted.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    /// Uncompressed P-256 points.
    keys: Vec<Vec<u8>>,
}

impl TrustedKeys {
    /// Every `PUBLIC KEY` block of `text` (at least one).
    pub fn from_pem(text: &str) -> Result<TrustedKeys, SignatureError> {
        let mut keys = Vec::new();
        for der in pem_blocks(text, "PUBLIC KEY")? {
            let point = der
                .strip_prefix(&P256_SPKI_PREFIX[..])
                .filter(|p| p.len() == 65 && p[0] == 4)
                .ok_or_else(|| SignatureError::Key("not an ECDSA P-256 public key".into()))?;
            keys.push(point.to_vec());
        }
        if keys.is_empty() {
            return Err(SignatureError::Key("no PUBLIC KEY block".into()));
        }
        Ok(TrustedKeys { keys })
    }

    /// Adds `other`'s keys.
    pub fn extend(&mut self, other: TrustedKeys) {
        self.keys.extend(other.keys);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    fn verifies(&self, msg: &[u8], signature: &[u8]) -> bool {
        self.keys.iter().any(|k| {
            UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_ASN1, k)
                .verify(msg, signature)
                .is_ok()
        })
    }
}

/// The simple-signing payload for `digest` in `docker_reference` (a repository).
pub fn payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    let v = json!({
        "critical": {
            "identity": { "docker-reference": docker_reference },
            "image": { "docker-manifest-digest": digest },
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Whether `raw` is a simple-signing payload about `digest`.
fn payload_names(raw: &[u8], digest: &str) -> bool {
    #[derive(Deserialize)]
    struct Payload {
        critical: Critical,
    }
    #[derive(Deserialize)]
    struct Critical {
        image: Image,
        #[serde(rename = "type")]
        type_: String,
    }
    #[derive(Deserialize)]
    struct Image {
        #[serde(rename = "docker-manifest-digest")]
        digest: String,
    }
    serde_json::from_slice::<Payload>(raw)
        .is_ok_and(|p| p.critical.type_ == PAYLOAD_TYPE && p.critical.image.digest == digest)
}

/// Cosign's tag for the signatures of `digest`: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &str) -> Result<String, SignatureError> {
    let hex = oci::digest_hex(digest).map_err(|e| SignatureError::Format {
        digest: digest.to_string(),
        message: e.to_string(),
    })?;
    Ok(format!("sha256-{hex}.sig"))
}

/// Signs `subject` (a manifest in `store`, whose repository is `docker_reference`) with
/// `key`, adding to the signatures already there. Returns the signature manifest.
pub async fn sign(
    store: &dyn Store,
    docker_reference: &str,
    subject: &Descriptor,
    key: &SigningKey,
) -> Result<Descriptor, SignatureError> {
    let tag = signature_tag(&subject.digest)?;
    let body = payload(docker_reference, &subject.digest);
    let signature = B64.encode(key.sign(&body)?);
    let mut layer = store.put_blob(SIMPLE_SIGNING, body.into()).await?;
    layer.annotations = Some(BTreeMap::from([(
        SIGNATURE_ANNOTATION.to_string(),
        signature,
    )]));
    // Signatures others made stay (cosign appends too).
    let mut layers = match store.get_manifest(&tag).await {
        Ok(raw) => match raw.parse() {
            Ok(Manifest::Image(m)) => m.layers,
            _ => Vec::new(),
        },
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    layers.retain(|l| l.digest != layer.digest);
    layers.push(layer);
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap_or_default();
    let config = store.put_blob(oci::OCI_CONFIG, config.into()).await?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config,
        layers,
        subject: Some(Descriptor::new(
            &subject.media_type,
            subject.digest.clone(),
            subject.size,
        )),
        annotations: None,
    };
    let raw = RawManifest::new(
        serde_json::to_vec(&manifest).unwrap_or_default().into(),
        Some(oci::OCI_MANIFEST),
    );
    let mut desc = store.put_manifest(&raw, Some(&tag)).await?;
    desc.artifact_type = Some(SIGNATURE_ARTIFACT_TYPE.to_string());
    store.add_referrer(&subject.digest, &desc).await?;
    Ok(desc)
}

/// Succeeds when `digest` (a manifest in `store`) carries a signature by one of `keys`.
pub async fn verify(
    store: &dyn Store,
    digest: &str,
    keys: &TrustedKeys,
) -> Result<(), SignatureError> {
    let not_signed = || SignatureError::NotSigned {
        digest: digest.to_string(),
    };
    let raw = match store.get_manifest(&signature_tag(digest)?).await {
        Ok(raw) => raw,
        Err(e) if e.is_not_found() => return Err(not_signed()),
        Err(e) => return Err(e.into()),
    };
    let Ok(Manifest::Image(m)) = raw.parse() else {
        return Err(SignatureError::Format {
            digest: digest.to_string(),
            message: "not an image manifest".into(),
        });
    };
    for layer in m
        .layers
        .iter()
        .filter(|l| l.media_type == SIMPLE_SIGNING && l.size <= MAX_PAYLOAD)
        .take(MAX_SIGNATURES)
    {
        let Some(Ok(signature)) = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(SIGNATURE_ANNOTATION))
            .map(|s| B64.decode(s))
        else {
            continue;
        };
        // One unreadable signature does not hide the others.
        let Ok(body) = store.get_blob(&layer.digest, MAX_PAYLOAD).await else {
            continue;
        };
        if keys.verifies(&body, &signature) && payload_names(&body, digest) {
            return Ok(());
        }
    }
    Err(not_signed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_signatures_verify_only_with_their_key() {
        let (private, public) = SigningKey::generate().unwrap();
        let key = SigningKey::from_pem(&private).unwrap();
        assert_eq!(key.public_pem(), public);
        let trusted = TrustedKeys::from_pem(&public).unwrap();
        let body = payload("r.io/a", "sha256:00");
        let s = key.sign(&body).unwrap();
        assert!(trusted.verifies(&body, &s));
        let mut other = body.clone();
        other[5] ^= 1;
        assert!(!trusted.verifies(&other, &s));
        let (_, stranger) = SigningKey::generate().unwrap();
        assert!(
            !TrustedKeys::from_pem(&stranger)
                .unwrap()
                .verifies(&body, &s)
        );
        // Several keys in one file; any of them verifies.
        let both = TrustedKeys::from_pem(&format!("{stranger}{public}")).unwrap();
        assert_eq!(both.len(), 2);
        assert!(both.verifies(&body, &s));
    }

    #[test]
    fn payloads_name_their_digest() {
        let body = payload("r.io/a", "sha256:ab");
        assert!(payload_names(&body, "sha256:ab"));
        assert!(!payload_names(&body, "sha256:cd"));
        assert!(!payload_names(b"{}", "sha256:ab"));
        assert_eq!(
            signature_tag(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            format!("sha256-{}.sig", "a".repeat(64))
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            TrustedKeys::from_pem("nothing").unwrap_err().reason(),
            "key"
        );
        assert!(
            TrustedKeys::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
        assert!(
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
    }
}
