//! talaria-controller binary (the reconciler lands with the controller issue).
fn main() -> anyhow::Result<()> {
    anyhow::bail!("talaria-controller: not implemented yet; see `crdgen` for the CRDs")
}
