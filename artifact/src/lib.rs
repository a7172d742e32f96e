//! Talaria artifact library: layer index, startup plan, artifact format, registry I/O.
//!
//! - [`source`]: ranged reads of blobs from anywhere.
//! - [`index`], [`indexer`], [`reader`]: the layer index, building it in one pass, and
//!   verified random access to any file of a layer through it.
//! - [`registry`], [`layout`], [`store`]: OCI registries and OCI image layout directories
//!   behind one store interface; [`artifact`]: the accelerated/default artifact and its resolution.

pub mod source;

pub mod index;
pub mod indexer;
pub mod reader;

pub mod artifact;
pub mod auth;
pub mod build;
pub mod layout;
pub mod registry;
pub mod startup;
pub mod store;
