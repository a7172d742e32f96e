//! Talaria artifact library: layer index, startup plan, artifact format, registry I/O.
//!
//! Read top-down, each layer uses only those listed above it (`hack/check-layers.py`
//! checks it):
//!
//! 1. [`source`]: ranged reads of blobs from anywhere.
//! 2. [`oci`]: OCI data types; the registry client ([`oci::registry`]), OCI image layout
//!    directories ([`oci::layout`]) and one store interface over both ([`oci::store`]);
//!    [`signature`]: cosign-compatible signatures of manifests in a store.
//! 3. [`index`]: the layer index format, building it in one pass ([`index::indexer`]) and
//!    verified random access to any file of a layer through it ([`index::reader`]).
//! 4. [`view`]: the merged file system of an image's layers, and path resolution in it.
//! 5. [`startup`]: startup analysis: the image analyzer and the generic planner side by side,
//!    recorded traces, the plan and the pack.
//! 6. [`format`]: the artifact format (manifest, annotations, ranking); [`discover`]: finding
//!    an image's artifacts in a store and loading their blobs.
//! 7. [`build`]: the build pipeline, on top of everything.

pub mod source;

pub mod oci;
pub mod signature;

pub mod index;

pub mod view;

pub mod startup;

pub mod discover;
pub mod format;

pub mod build;
