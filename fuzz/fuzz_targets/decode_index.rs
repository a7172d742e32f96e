//! Decoding arbitrary bytes as a layer index never panics or over-allocates, and whatever decodes re-encodes to an index that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::index::LayerIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = LayerIndex::decode(data) {
        let again = LayerIndex::decode(&ix.encode()).expect("re-encoded index decodes");
        assert!(again == ix);
        for i in 0..ix.spans.len() {
            let (s, e) = ix.compressed_range(i);
            assert!(s < e && e <= ix.compressed_size);
        }
        let _ = ix.span_for(ix.uncompressed_size / 2);
        let _ = ix.find("a/b");
    }
});
