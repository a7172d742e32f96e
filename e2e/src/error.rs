use std::path::PathBuf;
use std::time::Duration;

/// Why a test component could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{name} not found in {} or PATH: run hack/setup.sh", dir.display())]
    ToolNotFound { name: String, dir: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{name} exited early ({status}); log tail:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },

    #[error("{name}: {what} not reached within {waited:?}; log tail:\n{log_tail}")]
    Timeout {
        name: String,
        what: String,
        waited: Duration,
        log_tail: String,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("generating certificates: {0}")]
    Cert(#[from] rcgen::Error),

    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("HTTP {context}: {detail}")]
    Http { context: String, detail: String },

    #[error("image: {0}")]
    Image(String),

    #[error("network shaping: {0}")]
    Shaping(String),

    #[error("cluster: {0}")]
    Cluster(String),
}

impl EnvError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EnvError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn kube(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        EnvError::Kube {
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn http(context: impl Into<String>, detail: impl Into<String>) -> Self {
        EnvError::Http {
            context: context.into(),
            detail: detail.into(),
        }
    }
}
