//! Inflating one span alone from its checkpoint, and (de)compressing checkpoint windows.

use sha2::{Digest, Sha256};

use super::zlib::{Flush, Inflater, Status, WINDOW_SIZE, Wrap};
use super::{Compression, LayerIndex, Span};

/// Why a span could not be reconstructed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpanError {
    #[error("compressed data for the span is corrupt: {0}")]
    Corrupt(String),
    #[error("compressed data ends before the span is complete ({got} of {want} bytes)")]
    Short { got: u64, want: u64 },
    #[error("checkpoint window is corrupt: {0}")]
    Window(String),
    #[error("digest mismatch: index says {expected}, data hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{0} layers cannot be read through an index")]
    Unsupported(&'static str),
    #[error("wrong amount of compressed data: got {got} bytes, the span needs {want}")]
    WrongInput { got: u64, want: u64 },
}

/// zlib-compresses a window (windows compress well: mostly text or code; the adler32
/// lets the decoder reject a corrupted window up front).
pub(crate) fn compress_window(compressor: &mut flate2::Compress, window: &[u8]) -> Vec<u8> {
    compressor.reset();
    // A 32 KiB window never deflates to more than this (stored blocks + headers).
    let mut out = Vec::with_capacity(window.len() + window.len() / 8 + 64);
    loop {
        let before_in = compressor.total_in() as usize;
        match compressor.compress_vec(
            &window[before_in.min(window.len())..],
            &mut out,
            flate2::FlushCompress::Finish,
        ) {
            Ok(flate2::Status::StreamEnd) => break,
            Ok(_) => out.reserve(out.capacity().max(1024)),
            // Deflating in memory only fails on misuse; fall back to an empty marker the
            // decoder rejects rather than panicking.
            Err(_) => return Vec::new(),
        }
    }
    out
}

/// Inflates a checkpoint window, checking it has exactly `len` bytes.
pub(crate) fn decompress_window(data: &[u8], len: u32) -> Result<Vec<u8>, SpanError> {
    let len = len as usize;
    if len > WINDOW_SIZE {
        return Err(SpanError::Window(format!("window of {len} bytes")));
    }
    if len == 0 {
        return if data.is_empty() {
            Ok(Vec::new())
        } else {
            Err(SpanError::Window("data for an empty window".into()))
        };
    }
    let mut d = flate2::Decompress::new(true);
    // One spare byte detects windows longer than announced.
    let mut out = Vec::with_capacity(len + 1);
    match d.decompress_vec(data, &mut out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => {}
        Ok(_) => return Err(SpanError::Window("truncated or oversized window".into())),
        Err(e) => return Err(SpanError::Window(e.to_string())),
    }
    if out.len() != len || d.total_in() as usize != data.len() {
        return Err(SpanError::Window(format!(
            "window inflates to {} bytes from {} of {} input bytes, expected {len}",
            out.len(),
            d.total_in(),
            data.len()
        )));
    }
    Ok(out)
}

/// Reconstructs span `i` from `compressed` = the blob bytes `compressed_range(i)`, and verifies
/// its SHA-256. Returns the uncompressed bytes only if they match the index. An index whose
/// windows are separate needs [`inflate_span_with_windows`] for spans that have one.
pub fn inflate_span(index: &LayerIndex, i: usize, compressed: &[u8]) -> Result<Vec<u8>, SpanError> {
    inflate_span_with_windows(index, i, compressed, None)
}

/// [`inflate_span`] with `windows` = the windows blob bytes `[start, ..)`, for an index whose
/// windows are separate. A wrong window cannot pass: the span's digest is checked.
pub fn inflate_span_with_windows(
    index: &LayerIndex,
    i: usize,
    compressed: &[u8],
    windows: Option<(u64, &[u8])>,
) -> Result<Vec<u8>, SpanError> {
    let span = index
        .spans
        .get(i)
        .ok_or(SpanError::WrongInput { got: 0, want: 0 })?;
    let want_in = span.compressed_end.saturating_sub(span.compressed_offset);
    if compressed.len() as u64 != want_in {
        return Err(SpanError::WrongInput {
            got: compressed.len() as u64,
            want: want_in,
        });
    }
    let data = match index.compression {
        Compression::None => compressed.to_vec(),
        Compression::Gzip => {
            let window: &[u8] = match span.window_at {
                None => &span.window,
                Some((at, len)) => {
                    let (start, w) = windows.ok_or_else(|| {
                        SpanError::Window(
                            "the span's window is in the windows blob, not given".into(),
                        )
                    })?;
                    at.checked_sub(start)
                        .and_then(|a| {
                            let a = usize::try_from(a).ok()?;
                            w.get(a..a.checked_add(usize::try_from(len).ok()?)?)
                        })
                        .ok_or_else(|| {
                            SpanError::Window(format!(
                                "window [{at}, +{len}) not within the {} bytes given from {start}",
                                w.len()
                            ))
                        })?
                }
            };
            inflate_gzip_span(span, compressed, window)?
        }
        Compression::Zstd => return Err(SpanError::Unsupported("zstd")),
    };
    verify(span, &data)?;
    Ok(data)
}

fn verify(span: &Span, data: &[u8]) -> Result<(), SpanError> {
    let actual: [u8; 32] = Sha256::digest(data).into();
    if actual != span.digest || data.len() as u64 != span.uncompressed_size {
        return Err(SpanError::DigestMismatch {
            expected: hex::encode(span.digest),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

fn inflate_gzip_span(span: &Span, compressed: &[u8], window: &[u8]) -> Result<Vec<u8>, SpanError> {
    let corrupt = |e: super::zlib::ZError| SpanError::Corrupt(e.to_string());
    let want = span.uncompressed_size;
    let mut inf = Inflater::new(Wrap::Raw).map_err(corrupt)?;
    let mut input = compressed;
    if span.bits != 0 {
        // The span starts inside this byte: its high (8 - bits) bits are the first ones.
        let (&first, rest) = input
            .split_first()
            .ok_or(SpanError::Short { got: 0, want })?;
        inf.prime(8 - span.bits, first >> span.bits)
            .map_err(corrupt)?;
        input = rest;
    }
    if span.window_len > 0 {
        let window = decompress_window(window, span.window_len)?;
        inf.set_dictionary(&window).map_err(corrupt)?;
    }
    let len = usize::try_from(want).map_err(|_| SpanError::Short { got: 0, want })?;
    let mut out = vec![0u8; len];
    let mut filled = 0usize;
    while filled < len {
        let step = inf
            .inflate(input, &mut out[filled..], Flush::None)
            .map_err(corrupt)?;
        input = &input[step.consumed..];
        filled += step.produced;
        if step.status == Status::StreamEnd && filled < len {
            return Err(SpanError::Short {
                got: filled as u64,
                want,
            });
        }
        if step.consumed == 0 && step.produced == 0 {
            return Err(SpanError::Short {
                got: filled as u64,
                want,
            });
        }
    }
    Ok(out)
}
