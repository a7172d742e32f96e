//! Writes the CRD YAML files into a directory (default `crds/`).
use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crds".into());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
    for (name, yaml) in talaria_controller::crdgen::crd_files()? {
        let path = std::path::Path::new(&dir).join(&name);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
