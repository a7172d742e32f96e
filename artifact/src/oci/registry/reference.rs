//! Names of repositories and images on a registry.

use super::RegistryError;
use crate::oci;

/// A repository on a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry host as the API is reached (`host[:port]`; Docker Hub resolved).
    pub registry: String,
    /// Repository name (`library/busybox`).
    pub name: String,
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed registry image reference: repository plus tag and/or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `registry/repo:tag`, `registry/repo@sha256:...`, `repo` (Docker Hub, `latest`).
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let r: oci_client::Reference =
            s.parse()
                .map_err(|e: oci_client::ParseError| RegistryError::BadReference {
                    reference: s.to_string(),
                    message: e.to_string(),
                })?;
        if let Some(d) = r.digest() {
            oci::digest_hex(d)?;
        }
        // Repository names are lower case. containerd and Docker read an upper-case first
        // component as a registry host where this parser would make it part of a Docker Hub
        // name: refused, so a pull secret is never filed under another registry (fuzzing
        // found `Abc/x`).
        if r.repository().chars().any(|c| c.is_ascii_uppercase()) {
            return Err(RegistryError::BadReference {
                reference: s.to_string(),
                message: "repository names are lower case".into(),
            });
        }
        Ok(ImageRef {
            repository: Repository {
                registry: r.resolve_registry().to_string(),
                name: r.repository().to_string(),
            },
            tag: r.tag().map(str::to_string),
            digest: r.digest().map(str::to_string),
        })
    }

    /// The manifest reference to fetch: the digest when there is one, else the tag.
    pub fn reference(&self) -> String {
        self.digest
            .clone()
            .or_else(|| self.tag.clone())
            .unwrap_or_else(|| "latest".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn references() {
        let r = ImageRef::parse("127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(r.repository.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.name, "a/b");
        assert_eq!(r.reference(), "v1");
        let d = ImageRef::parse(&format!("reg.io/x@{}", oci::EMPTY_DIGEST)).unwrap();
        assert_eq!(d.reference(), oci::EMPTY_DIGEST);
        assert!(ImageRef::parse("not a reference").is_err());
        assert!(ImageRef::parse("reg.io/x@sha256:short").is_err());
        // containerd would pull `Abc/x` from host `Abc`, not Docker Hub.
        assert!(ImageRef::parse("Abc/x").is_err());
        assert!(ImageRef::parse("Reg.io/x:1").is_ok());
    }
}
