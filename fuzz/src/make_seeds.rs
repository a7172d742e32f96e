//! Writes seed inputs for the fuzz targets: the encoded index of a small real layer.
//! Usage: make_seeds <tar file> <output dir>

use talaria_artifact::index::Compression;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(tar), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: make_seeds <tar file> <output dir>");
        std::process::exit(2);
    };
    let data = std::fs::read(tar).expect("read tar");
    for (name, span) in [("seed-index-1k", 1024), ("seed-index-4k", 4096)] {
        let ix = index_layer(
            &data[..],
            Compression::None,
            &IndexOptions { span_size: span },
        )
        .expect("index seed layer")
        .index;
        std::fs::write(format!("{out}/{name}"), ix.encode()).expect("write seed");
    }
}
