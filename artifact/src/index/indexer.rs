//! Builds a [`LayerIndex`] from a layer blob in one streaming pass.
//!
//! Two stages on two threads joined by a bounded channel of recycled buffers (memory stays a
//! few MiB whatever the layer size):
//! 1. the calling thread reads the blob, hashes it (layer digest) and inflates it, stopping
//!    at the first deflate block boundary after every `span_size` bytes to record a checkpoint
//!    (bit-exact position + 32 KiB history window);
//! 2. a worker thread hashes the uncompressed stream (diff_id and per-span digests),
//!    compresses the windows and parses the tar table of contents.

use std::io::Read;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use sha2::{Digest, Sha256};

use crate::index::span::compress_window;
use crate::index::tar::{TarError, TarParser};
use crate::index::zlib::{Flush, Inflater, Status, Wrap, ZError};
use crate::index::{
    Compression, LayerIndex, MAX_SPAN_OVERSHOOT, MAX_SPAN_SIZE, MIN_SPAN_SIZE, Span,
};

/// Size of the recycled uncompressed buffers passed between the stages.
const OUT_BUF: usize = 256 * 1024;
/// Number of such buffers: bounds the pipeline's memory.
const N_BUFS: usize = 8;
/// Compressed read size.
const IN_BUF: usize = 128 * 1024;

/// Indexing knobs.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// Uncompressed bytes between checkpoints (a span may overshoot to the next deflate block
    /// boundary). Default 4 MiB.
    pub span_size: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            span_size: 4 * 1024 * 1024,
        }
    }
}

/// The index and the digests of what was read.
#[derive(Clone, Debug)]
pub struct IndexOutput {
    pub index: LayerIndex,
    /// `"sha256:<hex>"` of the input bytes: compare with the layer digest.
    pub compressed_digest: String,
    pub compressed_size: u64,
    /// `"sha256:<hex>"` of the uncompressed tar.
    pub diff_id: String,
}

/// Why a layer could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("layer is not indexable: {0}")]
    NotIndexable(String),
    #[error("invalid index options: {0}")]
    Options(String),
    #[error("reading the layer blob: {0}")]
    Io(#[source] std::io::Error),
    #[error("corrupt gzip data near compressed offset {offset}: {message}")]
    Gzip { offset: u64, message: String },
    #[error("gzip stream is truncated (input ends at compressed offset {offset})")]
    TruncatedGzip { offset: u64 },
    #[error("unexpected data after the end of the gzip stream at compressed offset {offset}")]
    TrailingGarbage { offset: u64 },
    #[error("layer tar is invalid: {0}")]
    Tar(#[from] TarError),
    #[error(
        "a deflate block too large to checkpoint: span of {size} bytes at uncompressed offset {offset}"
    )]
    SpanTooLarge { offset: u64, size: u64 },
    #[error("indexing pipeline failed: {0}")]
    Pipeline(String),
}

/// Uncompressed regions of a layer that a start reads (from a recorded trace), where spans
/// are made finer: a read there fetches and verifies a small span instead of a whole one.
/// Elsewhere spans keep the index's span size, so the index (one 32 KiB window per span)
/// grows only where startup reads are.
#[derive(Clone, Debug, Default)]
pub struct HotRegions {
    /// Sorted, disjoint `[start, end)`.
    ranges: Vec<(u64, u64)>,
    span_size: u64,
}

/// How far before a hot region fine spans begin (at least).
const HOT_LEAD: u64 = 128 << 10;

/// Most hot regions kept; past it the closest neighbours merge.
pub const MAX_HOT_REGIONS: usize = 100_000;

impl HotRegions {
    /// Regions `[start, end)` (any order, overlaps allowed) with spans of `span_size` there.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>, span_size: u64) -> HotRegions {
        // A checkpoint lands on the first deflate block boundary past its target, so the
        // span before a region overshoots into it by up to a block (often ~100 KiB): regions
        // start early by that much, so their first bytes fall in a fine span.
        let lead = span_size.max(HOT_LEAD);
        let mut v: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|(s, e)| s < e)
            .map(|(s, e)| (s.saturating_sub(lead), e))
            .collect();
        v.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                // Regions closer than a fine span share it anyway.
                Some(last) if s <= last.1.saturating_add(span_size) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        if merged.len() > MAX_HOT_REGIONS {
            // Bounded: one region per chunk of neighbours.
            let per = merged.len().div_ceil(MAX_HOT_REGIONS);
            merged = merged
                .chunks(per)
                .map(|c| (c[0].0, c.iter().map(|r| r.1).max().unwrap_or(c[0].1)))
                .collect();
        }
        HotRegions {
            ranges: merged,
            span_size: span_size.clamp(MIN_SPAN_SIZE, MAX_SPAN_SIZE),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes inside the regions (with their lead-in).
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The span length to aim for from uncompressed offset `pos`: fine inside a region,
    /// otherwise up to the next region's start (so a span ends where the region begins),
    /// never more than `coarse`.
    fn target(&self, pos: u64, coarse: u64) -> u64 {
        let fine = self.span_size.min(coarse);
        let i = self.ranges.partition_point(|r| r.1 <= pos);
        match self.ranges.get(i) {
            Some(&(s, _)) if s <= pos => fine,
            Some(&(s, _)) => (s - pos).clamp(fine, coarse),
            None => coarse,
        }
    }
}

/// Indexes a layer blob read from `input` (read once, sequentially, to its end).
pub fn index_layer<R: Read>(
    input: R,
    compression: Compression,
    opts: &IndexOptions,
) -> Result<IndexOutput, IndexError> {
    index_layer_hot(input, compression, opts, &HotRegions::default())
}

/// [`index_layer`] with finer spans in `hot` regions.
pub fn index_layer_hot<R: Read>(
    input: R,
    compression: Compression,
    opts: &IndexOptions,
    hot: &HotRegions,
) -> Result<IndexOutput, IndexError> {
    let span_size = opts.span_size;
    if !(MIN_SPAN_SIZE..=MAX_SPAN_SIZE).contains(&span_size) {
        return Err(IndexError::Options(format!(
            "span size {span_size} is outside {MIN_SPAN_SIZE}..={MAX_SPAN_SIZE}"
        )));
    }
    if compression == Compression::Zstd {
        return Err(IndexError::NotIndexable(
            "zstd layers cannot be indexed yet (only gzip and uncompressed tar)".into(),
        ));
    }
    let (tx, rx) = sync_channel::<Msg>(N_BUFS * 2 + 8);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(N_BUFS);
    for _ in 0..N_BUFS {
        // The receiver is alive; the channel has room for exactly these.
        let _ = free_tx.send(vec![0u8; OUT_BUF]);
    }
    let (produced, consumed) = std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("talaria-indexer".into())
            .spawn_scoped(s, move || consume(rx, free_tx, span_size));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                return (
                    Err(Stop::Failed(IndexError::Pipeline(format!(
                        "cannot start the worker thread: {e}"
                    )))),
                    Ok(Err(IndexError::Pipeline("not started".into()))),
                );
            }
        };
        let mut p = Producer {
            tx,
            free: free_rx,
            span_size,
            hot,
        };
        let produced = match compression {
            Compression::Gzip => p.gzip(input),
            _ => p.plain(input),
        };
        drop(p);
        (produced, worker.join())
    });
    let consumed = match consumed {
        Ok(c) => c,
        Err(_) => return Err(IndexError::Pipeline("the worker thread panicked".into())),
    };
    let ((compressed_size, compressed_digest), c) = match (produced, consumed) {
        (Ok(p), Ok(c)) => (p, c),
        // The worker stopped first: its error is the cause.
        (Err(Stop::Disconnected), Err(e)) => return Err(e),
        (Err(Stop::Disconnected), Ok(_)) => {
            return Err(IndexError::Pipeline("the worker stopped early".into()));
        }
        (Err(Stop::Failed(e)), _) => return Err(e),
        (Ok(_), Err(e)) => return Err(e),
    };
    let compressed_digest = match compression {
        Compression::None => c.diff_id,
        _ => compressed_digest,
    };
    let index = LayerIndex::new(
        compression,
        compressed_size,
        c.uncompressed_size,
        span_size,
        compressed_digest,
        c.diff_id,
        c.entries,
        c.spans,
    );
    tracing::debug!(
        compressed_size,
        uncompressed_size = index.uncompressed_size,
        entries = index.entries.len(),
        spans = index.spans.len(),
        "layer indexed"
    );
    Ok(IndexOutput {
        compressed_digest: index.compressed_digest_string(),
        diff_id: index.diff_id_string(),
        compressed_size,
        index,
    })
}

/// Stage-1 → stage-2 messages, in stream order.
enum Msg {
    Data(Vec<u8>),
    /// A checkpoint at the current uncompressed position.
    Checkpoint {
        compressed_offset: u64,
        bits: u8,
        window: Vec<u8>,
    },
    /// The compressed end of the open span.
    SpanEnd(u64),
    /// The input was read to its end without error.
    Done,
}

enum Stop {
    /// The worker hung up (it has the real error).
    Disconnected,
    Failed(IndexError),
}

impl From<IndexError> for Stop {
    fn from(e: IndexError) -> Self {
        Stop::Failed(e)
    }
}

struct Producer<'h> {
    tx: SyncSender<Msg>,
    free: Receiver<Vec<u8>>,
    span_size: u64,
    hot: &'h HotRegions,
}

fn read_some<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<usize, IndexError> {
    loop {
        match input.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(IndexError::Io(e)),
        }
    }
}

impl Producer<'_> {
    fn send(&self, m: Msg) -> Result<(), Stop> {
        self.tx.send(m).map_err(|_| Stop::Disconnected)
    }

    fn buffer(&self) -> Result<Vec<u8>, Stop> {
        let mut b = self.free.recv().map_err(|_| Stop::Disconnected)?;
        b.resize(OUT_BUF, 0);
        Ok(b)
    }

    /// Uncompressed tar: checkpoints every `span_size` bytes exactly, no windows.
    fn plain<R: Read>(&mut self, mut input: R) -> Result<(u64, [u8; 32]), Stop> {
        let mut pos = 0u64;
        let mut since = 0u64;
        let mut span_open = false;
        let mut target = self.hot.target(0, self.span_size);
        loop {
            let mut buf = self.buffer()?;
            let limit = (OUT_BUF as u64).min(target - since) as usize;
            let n = read_some(&mut input, &mut buf[..limit])?;
            if n == 0 {
                break;
            }
            if pos == 0 {
                sniff_uncompressed(&buf[..n])?;
            }
            buf.truncate(n);
            if since == 0 {
                if span_open {
                    self.send(Msg::SpanEnd(pos))?;
                }
                self.send(Msg::Checkpoint {
                    compressed_offset: pos,
                    bits: 0,
                    window: Vec::new(),
                })?;
                span_open = true;
            }
            self.send(Msg::Data(buf))?;
            pos += n as u64;
            since += n as u64;
            if since == target {
                since = 0;
                target = self.hot.target(pos, self.span_size);
            }
        }
        if span_open {
            self.send(Msg::SpanEnd(pos))?;
        }
        self.send(Msg::Done)?;
        // The digest of the blob is the diff_id, computed by the worker.
        Ok((pos, [0; 32]))
    }

    fn gzip<R: Read>(&mut self, mut input: R) -> Result<(u64, [u8; 32]), Stop> {
        let mut inbuf = vec![0u8; IN_BUF];
        let (mut in_start, mut in_end) = (0usize, 0usize);
        let mut eof = false;
        let mut hasher = Sha256::new();
        // Absolute compressed offset of inbuf[in_start].
        let mut pos = 0u64;
        let zerr = |pos: u64| {
            move |e: ZError| IndexError::Gzip {
                offset: pos,
                message: e.message,
            }
        };
        let mut inf = Inflater::new(Wrap::Gzip).map_err(zerr(0))?;
        let mut out = self.buffer()?;
        let mut out_len = 0usize;
        let mut members = 0u64;
        let mut in_member = false;
        let mut member_out = 0u64;
        let mut want_cp = true;
        let mut since = 0u64;
        // Uncompressed offset (across members), and the length the open span aims at.
        let mut upos = 0u64;
        let mut target = self.span_size;
        let mut span_open = false;
        let mut window = Vec::new();
        loop {
            if in_start == in_end && !eof {
                let n = read_some(&mut input, &mut inbuf)?;
                if n == 0 {
                    eof = true;
                } else {
                    if pos == 0 {
                        sniff_gzip(&inbuf[..n])?;
                    }
                    hasher.update(&inbuf[..n]);
                    in_start = 0;
                    in_end = n;
                }
            }
            if !in_member {
                if in_start == in_end {
                    if !eof {
                        continue;
                    }
                    if members == 0 {
                        return Err(IndexError::Gzip {
                            offset: 0,
                            message: "empty input is not a gzip stream".into(),
                        }
                        .into());
                    }
                    break;
                }
                if members > 0 {
                    // Another member must start with the gzip magic; anything else is garbage.
                    if inbuf[in_start] != 0x1f {
                        return Err(IndexError::TrailingGarbage { offset: pos }.into());
                    }
                    inf.reset().map_err(zerr(pos))?;
                }
                members += 1;
                member_out = 0;
                in_member = true;
                want_cp = true;
            }
            let room = out.len() - out_len;
            let (limit, flush) = if want_cp {
                (room, Flush::Block)
            } else {
                (
                    room.min(usize::try_from(target.saturating_sub(since)).unwrap_or(room)),
                    Flush::None,
                )
            };
            let step = inf
                .inflate(
                    &inbuf[in_start..in_end],
                    &mut out[out_len..out_len + limit],
                    flush,
                )
                .map_err(|e| {
                    if members > 1 && member_out == 0 {
                        IndexError::TrailingGarbage { offset: pos }
                    } else {
                        zerr(pos)(e)
                    }
                })?;
            in_start += step.consumed;
            pos += step.consumed as u64;
            out_len += step.produced;
            since += step.produced as u64;
            upos += step.produced as u64;
            member_out += step.produced as u64;
            let mut checkpointed = false;
            if step.status == Status::StreamEnd {
                if out_len > 0 {
                    out.truncate(out_len);
                    self.send(Msg::Data(std::mem::replace(&mut out, self.buffer()?)))?;
                    out_len = 0;
                }
                if span_open {
                    // The 8-byte trailer (CRC-32, length) is not needed to inflate the span.
                    self.send(Msg::SpanEnd(pos.saturating_sub(8)))?;
                    span_open = false;
                }
                in_member = false;
                continue;
            }
            if want_cp && step.at_block_boundary() {
                if out_len > 0 {
                    out.truncate(out_len);
                    self.send(Msg::Data(std::mem::replace(&mut out, self.buffer()?)))?;
                    out_len = 0;
                }
                let bitpos = (pos * 8).saturating_sub(step.unused_bits());
                if span_open {
                    self.send(Msg::SpanEnd(bitpos.div_ceil(8)))?;
                }
                inf.dictionary(&mut window).map_err(zerr(pos))?;
                self.send(Msg::Checkpoint {
                    compressed_offset: bitpos / 8,
                    bits: (bitpos % 8) as u8,
                    window: window.clone(),
                })?;
                span_open = true;
                since = 0;
                target = self.hot.target(upos, self.span_size);
                want_cp = false;
                checkpointed = true;
            } else if !want_cp && since >= target {
                want_cp = true;
            }
            if out_len == out.len() {
                self.send(Msg::Data(std::mem::replace(&mut out, self.buffer()?)))?;
                out_len = 0;
            }
            if step.consumed == 0 && step.produced == 0 && !checkpointed {
                if in_start == in_end {
                    if eof {
                        return Err(IndexError::TruncatedGzip { offset: pos }.into());
                    }
                } else if limit > 0 {
                    return Err(IndexError::Gzip {
                        offset: pos,
                        message: "inflate made no progress".into(),
                    }
                    .into());
                }
            }
        }
        if out_len > 0 {
            out.truncate(out_len);
            self.send(Msg::Data(out))?;
        }
        self.send(Msg::Done)?;
        Ok((pos, hasher.finalize().into()))
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn sniff_gzip(head: &[u8]) -> Result<(), IndexError> {
    if head.starts_with(&ZSTD_MAGIC) {
        return Err(IndexError::NotIndexable(
            "the blob is zstd-compressed, not gzip".into(),
        ));
    }
    Ok(())
}

fn sniff_uncompressed(head: &[u8]) -> Result<(), IndexError> {
    if head.starts_with(&ZSTD_MAGIC) {
        return Err(IndexError::NotIndexable(
            "the blob is zstd-compressed, not an uncompressed tar".into(),
        ));
    }
    if head.starts_with(&GZIP_MAGIC) {
        return Err(IndexError::NotIndexable(
            "the blob is gzip-compressed, not an uncompressed tar".into(),
        ));
    }
    Ok(())
}

struct Consumed {
    uncompressed_size: u64,
    diff_id: [u8; 32],
    entries: Vec<crate::index::Entry>,
    spans: Vec<Span>,
}

struct OpenSpan {
    uncompressed_offset: u64,
    compressed_offset: u64,
    compressed_end: Option<u64>,
    bits: u8,
    window_len: u32,
    window: Vec<u8>,
}

fn consume(
    rx: Receiver<Msg>,
    free: SyncSender<Vec<u8>>,
    span_size: u64,
) -> Result<Consumed, IndexError> {
    let mut tar = TarParser::new();
    let mut diff = Sha256::new();
    let mut span_hash = Sha256::new();
    let mut spans = Vec::new();
    let mut open: Option<OpenSpan> = None;
    let mut total = 0u64;
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), true);
    let max_span = span_size + MAX_SPAN_OVERSHOOT;
    let close = |open: &mut Option<OpenSpan>,
                 span_hash: &mut Sha256,
                 spans: &mut Vec<Span>,
                 total: u64|
     -> Result<(), IndexError> {
        let Some(o) = open.take() else {
            return Ok(());
        };
        let size = total - o.uncompressed_offset;
        let digest: [u8; 32] = span_hash.finalize_reset().into();
        if size == 0 {
            // An empty gzip member: nothing to index.
            return Ok(());
        }
        let compressed_end = o
            .compressed_end
            .ok_or_else(|| IndexError::Pipeline("span closed without its end".into()))?;
        spans.push(Span {
            uncompressed_offset: o.uncompressed_offset,
            uncompressed_size: size,
            compressed_offset: o.compressed_offset,
            compressed_end,
            bits: o.bits,
            window_len: o.window_len,
            window: o.window.into(),
            window_at: None,
            digest,
        });
        Ok(())
    };
    loop {
        let msg = rx
            .recv()
            .map_err(|_| IndexError::Pipeline("the input stage stopped early".into()))?;
        match msg {
            Msg::Data(buf) => {
                let Some(o) = &open else {
                    return Err(IndexError::Pipeline(
                        "data before the first checkpoint".into(),
                    ));
                };
                diff.update(&buf);
                span_hash.update(&buf);
                tar.feed(&buf)?;
                total += buf.len() as u64;
                let size = total - o.uncompressed_offset;
                if size > max_span {
                    return Err(IndexError::SpanTooLarge {
                        offset: o.uncompressed_offset,
                        size,
                    });
                }
                // The producer may be gone after an error; dropping the buffer is then fine.
                let _ = free.try_send(buf);
            }
            Msg::Checkpoint {
                compressed_offset,
                bits,
                window,
            } => {
                close(&mut open, &mut span_hash, &mut spans, total)?;
                let window_len = window.len() as u32;
                let window = if window.is_empty() {
                    Vec::new()
                } else {
                    compress_window(&mut compressor, &window)
                };
                open = Some(OpenSpan {
                    uncompressed_offset: total,
                    compressed_offset,
                    compressed_end: None,
                    bits,
                    window_len,
                    window,
                });
            }
            Msg::SpanEnd(end) => {
                if let Some(o) = &mut open {
                    o.compressed_end = Some(end);
                }
            }
            Msg::Done => break,
        }
    }
    close(&mut open, &mut span_hash, &mut spans, total)?;
    let entries = tar.finish()?;
    Ok(Consumed {
        uncompressed_size: total,
        diff_id: diff.finalize().into(),
        entries,
        spans,
    })
}
