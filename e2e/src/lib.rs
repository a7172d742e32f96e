//! Test support: real registry, etcd + kube-apiserver and containerd, started on demand.
