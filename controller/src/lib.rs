//! talaria-controller: turns AccelerationPolicies into AcceleratedImages and their artifacts.

pub mod crdgen;
