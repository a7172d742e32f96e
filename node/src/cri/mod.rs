//! The CRI proxy between kubelet and containerd: it learns pull credentials and starts an
//! image's fetch when its pull begins.

pub mod proxy;
