//! Ranged reads of a blob, from anywhere: a registry, a local file, memory.
//!
//! The layer reader and the node's FUSE layer read compressed layer bytes through this trait,
//! so the same verified random-access code serves registry blobs, OCI layout files and tests.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// A boxed `Send` future; the trait stays object-safe so stores can hand out `Arc<dyn RangeSource>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors a range source reports. Sources add context (blob, repository) in `message`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("range {offset}+{len} is outside the blob of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("short read: asked {asked} bytes at {offset}, got {got}")]
    Short { offset: u64, asked: u64, got: u64 },
    #[error("{0}")]
    Remote(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

/// `Ok` when `[offset, offset + len)` lies within a blob of `size` bytes (overflow-safe);
/// every source checks this before it reads.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), SourceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(SourceError::OutOfRange { offset, len, size }),
    }
}

/// Random access to the bytes of one blob.
pub trait RangeSource: Send + Sync {
    /// Reads exactly the bytes `[offset, offset + len)`; a source that returns fewer is an error.
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>>;
}

/// A blob held in memory (tests, small blobs).
#[derive(Clone, Debug)]
pub struct MemorySource(pub Bytes);

impl RangeSource for MemorySource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let res = check_range(offset, len, self.0.len() as u64)
            .map(|()| self.0.slice(offset as usize..(offset + len) as usize));
        Box::pin(async move { res })
    }
}

/// A blob in a local file, read with positioned reads.
#[derive(Debug)]
pub struct FileSource {
    file: std::fs::File,
    size: u64,
    name: String,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> Result<Self, SourceError> {
        let io = |source| SourceError::Io {
            what: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        Ok(Self {
            file,
            size,
            name: path.display().to_string(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl RangeSource for FileSource {
    fn read_range(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            use std::os::unix::fs::FileExt;
            check_range(offset, len, self.size)?;
            let mut buf = vec![0u8; len as usize];
            // Local files are fast; a blocking positioned read is cheaper than a thread hop.
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|source| SourceError::Io {
                    what: self.name.clone(),
                    source,
                })?;
            Ok(Bytes::from(buf))
        })
    }
}
