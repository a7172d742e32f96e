//! Indexing arbitrary bytes (as gzip or as a plain tar) never panics or hangs; when it succeeds, the index round-trips through its encoding and every span can be inflated alone from the input and matches its digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::index::indexer::{IndexOptions, index_layer};
use talaria_artifact::index::{Compression, LayerIndex, inflate_span};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, blob)) = data.split_first() else {
        return;
    };
    let compression = if mode & 1 == 0 {
        Compression::Gzip
    } else {
        Compression::None
    };
    let span_size = 1024 << (mode >> 1 & 3);
    let Ok(out) = index_layer(blob, compression, &IndexOptions { span_size }) else {
        return;
    };
    let ix = out.index;
    assert_eq!(out.compressed_size, blob.len() as u64);
    let dec = LayerIndex::decode(&ix.encode()).expect("own encoding decodes");
    assert!(dec == ix);
    for i in 0..ix.spans.len() {
        let (s, e) = ix.compressed_range(i);
        let span = inflate_span(&ix, i, &blob[s as usize..e as usize]).expect("span inflates");
        assert_eq!(span.len() as u64, ix.spans[i].uncompressed_size);
    }
});
