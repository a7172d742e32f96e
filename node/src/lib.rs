//! talaria-node: a containerd proxy snapshotter.
//!
//! [`snapshotter::Snapshotter`] keeps snapshots like containerd's overlayfs snapshotter (same
//! directory roles, same mounts) with metadata in redb; [`service`] serves it as
//! `containerd.services.snapshots.v1.Snapshots` on a unix socket, registered in containerd as
//! `[proxy_plugins.talaria] type = "snapshot" address = "<socket>"`.
//! [`snapshotter::PrepareHook`] is where remote (lazy) layers plug in.

pub mod error;
pub mod metrics;

pub mod snapshot;

pub mod content;
pub mod layerfs;

pub mod remote;

pub mod cri;

pub mod holder;

pub use error::{Error, Result};

/// Code generated from `proto/` (containerd's public API, written for this crate).
pub mod proto {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
