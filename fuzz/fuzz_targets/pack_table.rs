//! A startup pack never panics: a table read from JSON checks or is refused, a chunk unpacks to exactly the bytes the table says or is refused (alike into a fresh or a reused buffer), and what PackWriter writes checks and unpacks back to the records added.
#![no_main]

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use talaria_artifact::startup::pack::{MAX_CHUNK_BYTES, PackCompression, PackTable, PackWriter};
use talaria_artifact_fuzz::split_nul;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        // A table (JSON) and a blob, as a node fetches them.
        0 => read(rest, false),
        // The same with every chunk's length and digest fixed to the blob's bytes, so that
        // decompression of arbitrary members is reached past the digest check.
        1 => read(rest, true),
        _ => write(rest),
    }
});

fn read(data: &[u8], fix: bool) {
    let (json, blob) = split_nul(data);
    let Ok(mut table) = serde_json::from_slice::<PackTable>(json) else {
        return;
    };
    let again: PackTable =
        serde_json::from_slice(&serde_json::to_vec(&table).expect("table serializes"))
            .expect("serialized table parses");
    assert_eq!(again, table, "table JSON round trip");
    if fix {
        table.size = blob.len() as u64;
        for c in &mut table.chunks {
            let off = (c.offset as usize).min(blob.len());
            let end = off.saturating_add(c.length as usize).min(blob.len());
            c.offset = off as u64;
            c.length = (end - off) as u64;
            c.sha256 = hex(&Sha256::digest(&blob[off..end]));
        }
    }
    if table.check().is_err() {
        return;
    }
    let records: usize = table.chunks.iter().map(|c| c.records.len()).sum();
    assert!(table.files() <= records);
    assert_eq!(
        table.bytes(),
        table.chunks.iter().map(|c| c.uncompressed).sum::<u64>()
    );
    // One buffer reused across chunks (as a node reads a pack) gives what a fresh one gives.
    let mut reused = Vec::new();
    for (i, c) in table.chunks.iter().enumerate() {
        assert!(c.offset + c.length <= table.size, "check bounds chunk {i}");
        assert!(c.uncompressed <= MAX_CHUNK_BYTES);
        let member = blob
            .get(c.offset as usize..(c.offset + c.length) as usize)
            .unwrap_or_default();
        let fresh = table.unpack_chunk(i, member);
        let into = table.unpack_chunk_into(i, member, &mut reused);
        match (&fresh, &into) {
            (Ok(bytes), Ok(())) => {
                assert_eq!(bytes.len() as u64, c.uncompressed, "chunk {i} size");
                assert!(
                    *bytes == reused,
                    "chunk {i}: a reused buffer holds other bytes"
                );
            }
            (Err(_), Err(_)) => {}
            _ => panic!(
                "chunk {i}: fresh buffer {:?}, reused buffer {into:?}",
                fresh.as_ref().map(Vec::len)
            ),
        }
    }
    assert!(table.unpack_chunk(table.chunks.len(), b"").is_err());
}

fn write(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let compression = if u.arbitrary::<bool>().unwrap_or(false) {
        PackCompression::Gzip
    } else {
        PackCompression::Zstd
    };
    let layers: Vec<String> = (0..u.int_in_range(1..=3u8).unwrap_or(1))
        .map(|i| format!("sha256:{i:064x}"))
        .collect();
    let mut w = PackWriter::with_compression(layers.clone(), compression);
    let mut added: Vec<(u32, String, u64, u64, Vec<u8>)> = Vec::new();
    let mut big = false;
    while !u.is_empty() && added.len() < 64 {
        let layer = u32::from(u.int_in_range(0..=layers.len() as u8 - 1).unwrap_or(0));
        let path: String = u.arbitrary().unwrap_or_default();
        let offset = u64::from(u.arbitrary::<u16>().unwrap_or(0));
        let len = u.arbitrary_len::<u8>().unwrap_or(0);
        // Now and then (once per input) a run longer than a chunk, to cross chunk boundaries.
        let bytes: Vec<u8> = match u.arbitrary::<u8>().unwrap_or(1) {
            0 if !big => {
                big = true;
                vec![0x5a; (1 << 20) + len]
            }
            _ => u.bytes(len).unwrap_or_default().to_vec(),
        };
        let file_size = offset + bytes.len() as u64 + u64::from(u.arbitrary::<u8>().unwrap_or(0));
        w.add(layer, &path, file_size, offset, &bytes).expect("add");
        added.push((layer, path, file_size, offset, bytes));
    }
    let total: u64 = added.iter().map(|a| a.4.len() as u64).sum();
    assert_eq!(w.bytes(), total);
    let (table, blob) = w.finish().expect("finish");
    table.check().expect("a written table checks");
    assert_eq!(table.compression, compression);
    assert_eq!(table.layers, layers);
    assert_eq!(table.size, blob.len() as u64);
    assert_eq!(
        table.digest,
        format!("sha256:{}", hex(&Sha256::digest(&blob)))
    );
    assert_eq!(table.bytes(), total);
    // Records in order give back every add (a long one split across records and chunks).
    let nonempty: Vec<_> = added.iter().filter(|a| !a.4.is_empty()).collect();
    let (mut k, mut done) = (0usize, 0usize);
    for (i, c) in table.chunks.iter().enumerate() {
        let member = &blob[c.offset as usize..(c.offset + c.length) as usize];
        let bytes = table
            .unpack_chunk(i, member)
            .expect("a written chunk unpacks");
        let mut at = 0usize;
        for r in &c.records {
            let a = nonempty.get(k).expect("no more records than adds");
            assert!(r.len > 0, "empty record");
            assert_eq!((r.layer, &r.path, r.file_size), (a.0, &a.1, a.2));
            assert_eq!(r.offset, a.3 + done as u64);
            let part = &bytes[at..at + r.len as usize];
            assert!(part == &a.4[done..done + part.len()], "record bytes");
            at += part.len();
            done += part.len();
            if done == a.4.len() {
                (k, done) = (k + 1, 0);
            }
        }
        assert_eq!(at, bytes.len(), "chunk {i}: its records cover it");
    }
    assert_eq!((k, done), (nonempty.len(), 0), "every add is in the pack");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
