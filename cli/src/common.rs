//! What the commands share: error → exit code, registry client and stores, platform,
//! human-readable sizes and digests.

use std::sync::Arc;

use anyhow::Context;
use clap::ValueEnum;
use talaria_artifact::build::BuildError;
use talaria_artifact::discover;
use talaria_artifact::format::{ArtifactInfo, rank};
use talaria_artifact::oci::Platform;
use talaria_artifact::oci::registry::credentials::Credentials;
use talaria_artifact::oci::registry::{RegistryClient, RegistryConfig};
use talaria_artifact::oci::store::{OpenedRef, Store, open_reference};
use talaria_artifact::signature::{self, SigningKey, TrustedKeys};

use crate::GlobalArgs;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Exit codes scripts can rely on.
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_NO_ARTIFACT: u8 = 4;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub error: anyhow::Error,
    pub code: u8,
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        self.code
    }
    pub fn new(code: u8, error: anyhow::Error) -> Self {
        CliError { error, code }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        // A missing manifest or blob anywhere in the chain means "not found".
        let not_found = error.chain().any(|c| {
            c.downcast_ref::<talaria_artifact::oci::store::StoreError>()
                .is_some_and(|e| e.is_not_found())
                || c.downcast_ref::<BuildError>()
                    .is_some_and(|e| matches!(e, BuildError::Store(s) if s.is_not_found()))
        });
        let code = if not_found {
            EXIT_NOT_FOUND
        } else {
            EXIT_ERROR
        };
        CliError { error, code }
    }
}

pub type CliResult<T> = Result<T, CliError>;

pub fn registry_client(g: &GlobalArgs) -> anyhow::Result<RegistryClient> {
    let mut cfg = RegistryConfig {
        insecure_hosts: g.insecure.clone(),
        ..RegistryConfig::default()
    };
    let path = g.docker_config.clone().or_else(|| {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker"))
            })?;
        Some(dir.join("config.json"))
    });
    if let Some(p) = path {
        // An explicitly named file must exist; the default one may not.
        if g.docker_config.is_some() || p.exists() {
            cfg.credentials = Credentials::from_docker_config_file(&p)
                .with_context(|| format!("reading registry credentials from {}", p.display()))?;
        }
    }
    RegistryClient::new(cfg).context("creating the registry client")
}

pub fn platform(g: &GlobalArgs) -> anyhow::Result<Platform> {
    match &g.platform {
        None => Ok(Platform::host()),
        Some(s) => Platform::parse(s)
            .with_context(|| format!("invalid platform {s:?}: expected os/arch[/variant]")),
    }
}

/// Writes a new signing key pair to `prefix`.key (mode 0600) and `prefix`.pub.
pub fn keygen(prefix: &std::path::Path) -> CliResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (private, public) = SigningKey::generate().context("generating a key pair")?;
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        std::path::PathBuf::from(p)
    };
    let (key, pubkey) = (with(".key"), with(".pub"));
    // Never over an existing key: it may be the only copy.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .with_context(|| format!("creating {}", key.display()))?;
    f.write_all(private.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    std::fs::write(&pubkey, public).with_context(|| format!("writing {}", pubkey.display()))?;
    eprintln!("wrote {} and {}", key.display(), pubkey.display());
    Ok(())
}

/// The public keys of `--key`, if any.
pub fn trusted_keys(g: &GlobalArgs) -> anyhow::Result<Option<TrustedKeys>> {
    let mut keys: Option<TrustedKeys> = None;
    for p in &g.keys {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading key {}", p.display()))?;
        let k = TrustedKeys::from_pem(&text).with_context(|| format!("key {}", p.display()))?;
        keys.get_or_insert_with(TrustedKeys::default).extend(k);
    }
    Ok(keys)
}

/// The artifact of `subject` a node would use: the best ranked one, and with `--key` the
/// best ranked one signed by one of those keys.
pub async fn choose_artifact(
    g: &GlobalArgs,
    store: &dyn Store,
    subject: &str,
) -> anyhow::Result<Option<ArtifactInfo>> {
    let Some(keys) = trusted_keys(g)? else {
        return Ok(discover::resolve(store, subject).await?);
    };
    for a in rank(discover::list_artifacts(store, subject).await?) {
        match signature::verify(store, &a.descriptor.digest, &keys).await {
            Ok(()) => return Ok(Some(a)),
            Err(e) => tracing::info!(artifact = %a.descriptor.digest, error = %e, "not used"),
        }
    }
    Ok(None)
}

/// The image's store and reference, and the store artifacts live in.
pub struct Stores {
    pub image: OpenedRef,
    pub artifacts: Arc<dyn Store>,
}

pub fn open_stores(
    g: &GlobalArgs,
    image: &str,
    create_artifact_repo: bool,
) -> anyhow::Result<Stores> {
    let client = registry_client(g)?;
    let opened =
        open_reference(image, &client, false).with_context(|| format!("opening image {image}"))?;
    let artifacts = match &g.artifact_repo {
        None => opened.store.clone(),
        Some(repo) => {
            // A repository reference needs a tag to parse; it is not used.
            let r = if repo.starts_with("oci:") {
                repo.clone()
            } else {
                format!("{repo}:artifacts")
            };
            open_reference(&r, &client, create_artifact_repo)
                .with_context(|| format!("opening artifact repository {repo}"))?
                .store
        }
    };
    Ok(Stores {
        image: opened,
        artifacts,
    })
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(10), "10 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
