//! Startup paths (profile `startup-local-v1`): predict the files an image reads while its
//! container starts, from the image config and the merged view of its layers, and turn them
//! into a prefetch plan.
//!
//! - [`resolve`]: path resolution inside the image root (symlinks bounded, never escaping).
//! - [`analyze()`]: the analyzer — entrypoint/cmd, PATH, shell `-c` scripts, shebangs, ELF
//!   interpreter and `DT_NEEDED` closure, runtime rules (JVM, Python, Node, shells) and
//!   system files. File bytes are read lazily through [`FileReader`] (only headers, the
//!   dynamic section, first lines and small config files).
//! - [`plan`]: files → byte ranges → spans of the layer that wins, in expected access
//!   order, within the prefetch budget; plus the normalized path patterns.
//!
//! Hostile images never make the analyzer panic or loop: every walk is bounded and every
//! problem is recorded as a [`Note`] saying what was skipped and why.

mod analyze;
pub mod elf;
pub mod generic;
pub mod jimage;
pub mod pack;
pub mod plan;

mod rules;
pub mod shell;
pub mod trace;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::index::Entry;
use crate::index::reader::{LayerReader, ReadError};
use crate::source::BoxFuture;

pub use analyze::analyze;
pub use plan::{PlanOptions, build_plan, path_patterns};
pub use trace::{StartupTrace, TraceRecorder, analysis_from_trace};

/// The default PATH of container runtimes when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why an image config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("image config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The parts of an OCI image config the analyzer uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=value` strings, as in the config.
    pub env: Vec<String>,
    /// Empty means `/`.
    pub working_dir: String,
    pub user: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRuntimeConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawRuntimeConfig>,
}

impl ImageConfig {
    /// Parses an OCI (or Docker) image config blob; absent fields are empty.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes)?;
        let c = raw.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        })
    }

    /// The process arguments as the runtime combines them: Entrypoint then Cmd.
    pub fn argv(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// The value of an environment variable (the last definition wins).
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env.iter().rev().find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

/// Reads bytes of the image's regular files (lazily, only what the analyzer asks for).
pub trait FileReader: Send + Sync {
    /// Up to `len` bytes at `offset` of the regular file `entry` of image layer `layer`;
    /// shorter at the end of the file.
    fn read<'a>(
        &'a self,
        layer: usize,
        entry: &'a Entry,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, ReadError>>;
}

impl<T: FileReader + ?Sized> FileReader for &T {
    fn read<'a>(
        &'a self,
        layer: usize,
        entry: &'a Entry,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, ReadError>> {
        (**self).read(layer, entry, offset, len)
    }
}

/// The real [`FileReader`]: one verified [`LayerReader`] per image layer (`None` for a
/// layer without an index, whose files are not in the merged view either).
pub struct LayerFiles {
    pub layers: Vec<Option<Arc<LayerReader>>>,
}

impl FileReader for LayerFiles {
    fn read<'a>(
        &'a self,
        layer: usize,
        entry: &'a Entry,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, ReadError>> {
        Box::pin(async move {
            match self.layers.get(layer).and_then(|l| l.as_ref()) {
                Some(r) => r.read_file(entry, offset, len).await,
                None => Err(ReadError::NotAFile {
                    path: entry.path.clone(),
                    kind: entry.kind,
                }),
            }
        })
    }
}

/// What part of startup a file belongs to; also its fetch priority (lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileClass {
    /// Executables and scripts of the entrypoint chain, and their ELF interpreter.
    Entrypoint = 0,
    /// Shared libraries of the ELF closure and the loader's caches.
    Library = 1,
    /// Runtime files: JVM, Python stdlib, Node entry scripts, app jars.
    Runtime = 2,
    /// System configuration: NSS, passwd, hosts, certificates, zoneinfo, locale.
    System = 3,
}

/// A byte range of a file, `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// One file the startup is predicted to read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundFile {
    /// Canonical path in the image (leading `/`, symlinks resolved).
    pub path: String,
    /// Image layer holding the file in the merged view.
    pub layer: usize,
    pub size: u64,
    /// Offset of the file's content in the layer's uncompressed tar stream.
    pub data_offset: u64,
    pub class: FileClass,
    /// The ranges expected to be read; the whole file unless a rule knows better.
    pub ranges: Vec<ByteRange>,
    /// Why the file was added (every rule that found it).
    pub reasons: Vec<String>,
}

/// Something the analyzer could not follow, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The path or item concerned.
    pub subject: String,
    pub message: String,
}

/// The analyzer's result: files in expected access order, the symlinks traversed on the
/// way (they are looked up but hold no data), and notes on what could not be followed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub files: Vec<FoundFile>,
    /// Symlinks (canonical path of the link itself) traversed while resolving.
    pub links: Vec<String>,
    pub notes: Vec<Note>,
    /// Bytes the analyzer read from the image.
    pub bytes_read: u64,
}

impl Analysis {
    pub fn file(&self, path: &str) -> Option<&FoundFile> {
        self.files.iter().find(|f| f.path == path)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.ranges)
            .map(|r| r.len)
            .sum()
    }
}
