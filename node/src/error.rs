//! Errors of the snapshotter, with the gRPC codes containerd's errdefs expects.

use std::io;

/// Everything that can go wrong in the snapshotter. The first four variants are the API
/// errors containerd reacts to (e.g. `AlreadyExists` on Prepare/Commit during unpack).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata store, {context}: {source}")]
    Db {
        context: String,
        #[source]
        source: redb::Error,
    },
    #[error("metadata record of {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn db<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> Error {
        move |e| Error::Db {
            context: context.to_string(),
            source: e.into(),
        }
    }

    /// The gRPC status containerd maps back to its errdefs.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Io { .. } | Error::Db { .. } | Error::Corrupt { .. } => Code::Internal,
        };
        tonic::Status::new(code, self.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}
