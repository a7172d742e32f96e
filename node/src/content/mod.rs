//! Where a layer's file bytes come from and how they are fetched: [`layer`] decides it for
//! every read of a mounted layer (local copy, startup pack in flight, spans); the span cache
//! ([`cache`]), the per-link fetch scheduler ([`sched`]), a registry's reachability
//! ([`reach`]), local copies of hot files and packed ranges ([`materialize`]), and the
//! startup prefetch and background fetch jobs ([`prefetch`]).

pub mod cache;
pub mod layer;
pub mod materialize;
pub mod prefetch;
pub mod reach;
pub mod sched;
