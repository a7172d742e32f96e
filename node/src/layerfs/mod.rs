//! The layer filesystem: a layer's inode tree ([`tree`], pure, from its index) and the FUSE
//! filesystem that serves it ([`fuse`]), reading file bytes through [`crate::content`].

pub mod fuse;
pub mod tree;

pub use fuse::{LayerFs, Served};
pub use tree::Tree;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("layer entry {path:?}: {message}")]
    Tree { path: String, message: String },
    #[error("mounting FUSE at {mountpoint}: {source}")]
    Mount {
        mountpoint: String,
        #[source]
        source: std::io::Error,
    },
}
