//! Registry clients by credentials, shared by resolution ([`crate::resolve`]) and builds
//! ([`crate::builder`]), and the metric reason of a registry failure.

use std::sync::Arc;

use talaria_artifact::oci::registry::credentials::Credentials;
use talaria_artifact::oci::registry::{ImageRef, RegistryClient, RegistryConfig, RegistryError};
use talaria_artifact::oci::store::{RegistryStore, StoreError};

use crate::metrics::Metrics;

/// A registry client could not be made, or a reference not parsed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    BadReference(RegistryError),
    #[error(transparent)]
    Client(RegistryError),
}

impl ClientError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientError::BadReference(_) => "bad_reference",
            ClientError::Client(_) => "registry_client",
        }
    }
}

/// Metric label of a failed store operation: what an operator would act on (credentials, a
/// missing image, a broken manifest, the registry itself).
pub fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Registry(RegistryError::Auth { .. })
        | StoreError::Registry(RegistryError::Status {
            status: 401 | 403, ..
        }) => "unauthorized",
        e if e.is_not_found() => "not_found",
        StoreError::BadReference { .. }
        | StoreError::Registry(RegistryError::BadReference { .. }) => "bad_reference",
        StoreError::Format(_) | StoreError::Registry(RegistryError::Format(_)) => "bad_manifest",
        _ => "registry",
    }
}

/// Registry clients by credentials: the anonymous one is shared; a client with credentials is
/// made per call (cheap next to a build, and it never mixes one policy's secrets into another's).
#[derive(Clone)]
pub struct Clients {
    base: RegistryConfig,
    anonymous: RegistryClient,
    pub(crate) metrics: Arc<Metrics>,
}

impl Clients {
    pub fn new(base: RegistryConfig, metrics: Arc<Metrics>) -> Result<Clients, ClientError> {
        let anonymous = RegistryClient::new(base.clone()).map_err(ClientError::Client)?;
        Ok(Clients {
            base,
            anonymous,
            metrics,
        })
    }

    fn client(&self, creds: &Credentials) -> Result<RegistryClient, ClientError> {
        if creds.is_empty() {
            return Ok(self.anonymous.clone());
        }
        let mut cfg = self.base.clone();
        cfg.credentials.merge(creds.clone());
        RegistryClient::new(cfg).map_err(ClientError::Client)
    }

    /// A store for `reference`'s repository, authenticated with `creds`.
    pub(crate) fn store(
        &self,
        reference: &str,
        creds: &Credentials,
    ) -> Result<(RegistryStore, ImageRef), ClientError> {
        let r = ImageRef::parse(reference).map_err(ClientError::BadReference)?;
        let client = self.client(creds)?;
        Ok((RegistryStore::new(client, r.repository.clone()), r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> StoreError {
        StoreError::Registry(RegistryError::Status {
            op: "GET manifest".into(),
            url: "https://r.io/v2/a/manifests/1".into(),
            status: code,
            message: String::new(),
        })
    }

    #[test]
    fn store_failures_are_labelled_by_what_to_fix() {
        assert_eq!(store_reason(&status(401)), "unauthorized");
        assert_eq!(store_reason(&status(403)), "unauthorized");
        assert_eq!(store_reason(&status(404)), "not_found");
        assert_eq!(store_reason(&status(500)), "registry");
        let bad = StoreError::BadReference {
            reference: "x".into(),
            message: "no".into(),
        };
        assert_eq!(store_reason(&bad), "bad_reference");
    }

    #[test]
    fn an_unparsable_reference_is_a_bad_reference() {
        let c = Clients::new(RegistryConfig::default(), Arc::new(Metrics::new())).expect("client");
        let e = c.store("UPPER CASE/not a ref", &Credentials::new()).err();
        assert_eq!(e.map(|e| e.reason()), Some("bad_reference"));
    }
}
