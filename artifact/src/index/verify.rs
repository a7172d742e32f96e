//! Checking a layer index against the layer it claims to describe, once every byte of the
//! layer is at hand: the uncompressed stream, fed in order, must hash to the image's diff_id
//! (the image config, which the manifest digest pins, vouches for it) and to the index's,
//! and its tar headers, parsed again, must give exactly the index's table of contents.
//!
//! Span digests are checked on every read already; they prove the bytes of each span, not
//! that the table of contents (paths, offsets, modes, owners, xattrs) fits them. This closes
//! that gap after the fact (defence in depth: a node serves only artifacts the cluster pins).
//! Pure: no I/O; memory is the tar parser's (capped like the indexer's: entries and path
//! bytes, see [`super::MAX_ENTRIES`]).

use sha2::{Digest, Sha256};

use super::tar::{TarError, TarParser};
use super::{Entry, LayerIndex};

/// Why a layer does not match its index.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the layer's tar stream does not parse: {0}")]
    Tar(#[from] TarError),
    #[error("the layer is {actual} bytes uncompressed; its index says {indexed}")]
    Size { indexed: u64, actual: u64 },
    #[error("the layer's diff_id is {actual}; {whose} says {expected}")]
    DiffId {
        whose: &'static str,
        expected: String,
        actual: String,
    },
    #[error(
        "the index's table of contents differs from the layer's tar headers at entry {at}: {detail}"
    )]
    TableOfContents { at: usize, detail: String },
}

impl VerifyError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Tar(_) => "tar",
            VerifyError::Size { .. } => "size",
            VerifyError::DiffId { .. } => "diff_id",
            VerifyError::TableOfContents { .. } => "table_of_contents",
        }
    }
}

/// Streams a layer's uncompressed bytes, in order, and checks them against an index.
pub struct LayerVerifier {
    tar: TarParser,
    diff: Sha256,
    total: u64,
}

impl Default for LayerVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerVerifier {
    pub fn new() -> Self {
        LayerVerifier {
            tar: TarParser::new(),
            diff: Sha256::new(),
            total: 0,
        }
    }

    /// The next bytes of the uncompressed stream.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        self.diff.update(data);
        self.total += data.len() as u64;
        self.tar.feed(data)?;
        Ok(())
    }

    /// Ends the stream. `image_diff_id` (`sha256:<hex>`) is the diff_id the image config
    /// gives this layer, when known.
    pub fn finish(
        self,
        index: &LayerIndex,
        image_diff_id: Option<&str>,
    ) -> Result<(), VerifyError> {
        let actual = format!("sha256:{}", hex::encode(self.diff.finalize()));
        if self.total != index.uncompressed_size {
            return Err(VerifyError::Size {
                indexed: index.uncompressed_size,
                actual: self.total,
            });
        }
        if let Some(expected) = image_diff_id
            && expected != actual
        {
            return Err(VerifyError::DiffId {
                whose: "the image config",
                expected: expected.to_string(),
                actual,
            });
        }
        if index.diff_id_string() != actual {
            return Err(VerifyError::DiffId {
                whose: "the index",
                expected: index.diff_id_string(),
                actual,
            });
        }
        let parsed = self.tar.finish()?;
        compare_entries(&index.entries, &parsed)
    }
}

/// The first difference between the index's entries and the parsed ones.
fn compare_entries(indexed: &[Entry], parsed: &[Entry]) -> Result<(), VerifyError> {
    for (at, (a, b)) in indexed.iter().zip(parsed).enumerate() {
        if a != b {
            let detail = if a.path != b.path {
                format!("index has {:?}, the layer {:?}", a.path, b.path)
            } else {
                format!("{:?}: the index's entry is not the layer's", a.path)
            };
            return Err(VerifyError::TableOfContents { at, detail });
        }
    }
    if indexed.len() != parsed.len() {
        return Err(VerifyError::TableOfContents {
            at: indexed.len().min(parsed.len()),
            detail: format!(
                "the index has {} entries, the layer {}",
                indexed.len(),
                parsed.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Compression;
    use crate::index::indexer::{IndexOptions, index_layer};

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn index_of(raw: &[u8]) -> LayerIndex {
        index_layer(raw, Compression::None, &IndexOptions::default())
            .unwrap()
            .index
    }

    fn verify(raw: &[u8], index: &LayerIndex, image: Option<&str>) -> Result<(), VerifyError> {
        let mut v = LayerVerifier::new();
        // Fed in odd pieces: headers straddle them.
        for piece in raw.chunks(333) {
            v.feed(piece)?;
        }
        v.finish(index, image)
    }

    #[test]
    fn an_honest_index_verifies() {
        let raw = tar_of(&[("etc/passwd", b"root:x:0:0\n"), ("bin/sh", &[7; 5000])]);
        let ix = index_of(&raw);
        verify(&raw, &ix, Some(&ix.diff_id_string())).unwrap();
        verify(&raw, &ix, None).unwrap();
    }

    #[test]
    fn a_stretched_file_is_caught() {
        let raw = tar_of(&[("etc/passwd", b"root:x:0:0\n"), ("bin/sh", &[7; 5000])]);
        let mut ix = index_of(&raw);
        // /etc/passwd made to run into the next entry: span digests would still hold.
        ix.entries[0].size += 600;
        let e = verify(&raw, &ix, None).unwrap_err();
        assert_eq!(e.reason(), "table_of_contents", "{e}");
        let mut ix = index_of(&raw);
        ix.entries[1].mode |= 0o4000;
        assert_eq!(
            verify(&raw, &ix, None).unwrap_err().reason(),
            "table_of_contents"
        );
        let mut ix = index_of(&raw);
        ix.entries.pop();
        assert_eq!(
            verify(&raw, &ix, None).unwrap_err().reason(),
            "table_of_contents"
        );
    }

    #[test]
    fn other_bytes_are_caught() {
        let raw = tar_of(&[("a", b"one")]);
        let ix = index_of(&raw);
        let other = tar_of(&[("a", b"two")]);
        let e = verify(&other, &ix, None).unwrap_err();
        assert_eq!(e.reason(), "diff_id", "{e}");
        // The image's diff_id wins over an index that agrees with the bytes.
        let e = verify(&raw, &ix, Some("sha256:00")).unwrap_err();
        assert!(e.to_string().contains("image config"), "{e}");
        let e = verify(&raw[..raw.len() - 512], &ix, None).unwrap_err();
        assert_eq!(e.reason(), "size", "{e}");
    }
}
