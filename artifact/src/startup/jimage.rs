//! Just enough of the JDK's module image (`lib/modules`, "jimage") to predict what a JVM
//! start reads of it: the JVM maps the file and looks classes and resources up through its
//! index (header, redirect and offset tables, location attributes, strings), then reads
//! the resources it did not find in the CDS archive (`classes.jsa`). Which resources those
//! are depends on what the program loads; with the default CDS archive a start reads few
//! of them (measured: 0.7 MiB of a 123 MiB image, most of it the index). So the index is
//! predicted, the resources are left to be read lazily.

use super::elf::{READ_AROUND, merge_pages};

/// Bytes of the header to read.
pub const HEADER_LEN: u64 = 28;
const MAGIC: u32 = 0xCAFE_DADA;
/// Largest index predicted (the JDK's is a few MiB).
const MAX_INDEX: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JimageError {
    #[error("not a jimage file")]
    NotJimage,
    #[error("unsupported jimage version {0}.{1}")]
    Version(u32, u32),
    #[error("malformed jimage: {0}")]
    Malformed(String),
}

/// The header fields that size the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub resource_count: u32,
    pub table_length: u32,
    pub locations_size: u32,
    pub strings_size: u32,
}

impl Header {
    /// Bytes from the start of the file to the first resource: header, redirect table,
    /// offsets table, locations, strings.
    pub fn index_size(&self) -> u64 {
        HEADER_LEN
            + u64::from(self.table_length) * 8
            + u64::from(self.locations_size)
            + u64::from(self.strings_size)
    }
}

/// Parses the header (native byte order of the JDK that wrote it: the magic tells).
pub fn parse_header(b: &[u8]) -> Result<Header, JimageError> {
    let word = |i: usize, little: bool| -> Option<u32> {
        let s: [u8; 4] = b.get(i * 4..i * 4 + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    };
    let little = match word(0, true) {
        Some(MAGIC) => true,
        Some(_) if word(0, false) == Some(MAGIC) => false,
        _ => return Err(JimageError::NotJimage),
    };
    let w = |i| word(i, little).ok_or_else(|| JimageError::Malformed("short header".into()));
    let version = w(1)?;
    let (major, minor) = (version >> 16, version & 0xffff);
    if major != 1 {
        return Err(JimageError::Version(major, minor));
    }
    Ok(Header {
        resource_count: w(3)?,
        table_length: w(4)?,
        locations_size: w(5)?,
        strings_size: w(6)?,
    })
}

/// The ranges a JVM start reads of a module image of `size` bytes: the index, plus the
/// read-around of the faults at its end (`(offset, len)`, on pages).
pub fn ranges(h: &Header, size: u64) -> Result<Vec<(u64, u64)>, JimageError> {
    let index = h.index_size();
    if index > size || index > MAX_INDEX {
        return Err(JimageError::Malformed(format!(
            "index of {index} bytes in a file of {size}"
        )));
    }
    Ok(merge_pages(
        vec![(0, index.saturating_add(READ_AROUND / 2))],
        size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(words: [u32; 7], little: bool) -> Vec<u8> {
        words
            .iter()
            .flat_map(|w| {
                if little {
                    w.to_le_bytes()
                } else {
                    w.to_be_bytes()
                }
            })
            .collect()
    }

    #[test]
    fn index_of_a_module_image() {
        let w = [MAGIC, 1 << 16, 0, 29479, 29479, 608663, 646735];
        for little in [true, false] {
            let h = parse_header(&header(w, little)).unwrap();
            assert_eq!(h.index_size(), 1491258);
            let r = ranges(&h, 128 << 20).unwrap();
            assert_eq!(r, vec![(0, (1491258 + 65536u64).div_ceil(4096) * 4096)]);
        }
        assert_eq!(parse_header(b"PK\x03\x04"), Err(JimageError::NotJimage));
        assert!(parse_header(&header(w, true)[..20]).is_err());
        let mut v2 = w;
        v2[1] = 2 << 16;
        assert_eq!(
            parse_header(&header(v2, true)),
            Err(JimageError::Version(2, 0))
        );
        let h = parse_header(&header(w, true)).unwrap();
        assert!(ranges(&h, 1000).is_err());
    }
}
