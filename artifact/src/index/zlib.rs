//! The one place with `unsafe`: a small safe wrapper over zlib-rs's zlib C API (`libz-rs-sys`).
//!
//! flate2 does not expose what random access into a gzip stream needs: stopping at deflate
//! block boundaries (`Z_BLOCK` + `data_type`), `inflatePrime`, `inflateSetDictionary` and
//! `inflateGetDictionary`. Everything here is plain zlib usage; the stream lives in a `Box`
//! because zlib's internal state keeps a pointer back to it, so it must never move.

use libz_rs_sys as z;

/// Size of a deflate history window.
pub(crate) const WINDOW_SIZE: usize = 32 * 1024;

/// What the compressed input is wrapped in.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wrap {
    /// gzip header and trailer (CRC-32 and length are checked by zlib).
    Gzip,
    /// Raw deflate, no header (used to resume from a checkpoint).
    Raw,
}

/// How far one `inflate` call may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Run as far as input and output allow.
    None,
    /// Also stop right after the gzip header and at every deflate block boundary.
    Block,
}

/// How an `inflate` call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Progress was made, or more input/output is needed.
    Ok,
    /// The end of the deflate stream (and, for gzip, its checked trailer) was reached.
    StreamEnd,
}

/// Result of one `inflate` call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    pub status: Status,
    /// zlib's `data_type`: bits held in the bit buffer (low 6 bits with zlib-rs, low 3 with
    /// zlib), +64 inside the last block, +128 at a block boundary or right after the header.
    pub data_type: i32,
}

impl Step {
    /// At a block boundary that is not the end of the stream: a checkpoint can be taken here.
    pub fn at_block_boundary(&self) -> bool {
        self.data_type & 128 != 0 && self.data_type & 64 == 0
    }

    /// Number of input bits consumed but not yet used, to locate the boundary at bit precision.
    pub fn unused_bits(&self) -> u64 {
        (self.data_type & 63) as u64
    }
}

/// A zlib error code with zlib's message, if any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("zlib error {code}: {message}")]
pub(crate) struct ZError {
    pub code: i32,
    pub message: String,
}

/// A streaming inflater.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream's state is owned exclusively by this value and only touched through
// `&mut self` (or `&self` for read-only calls); zlib has no thread affinity.
unsafe impl Send for Inflater {}

impl Inflater {
    pub fn new(wrap: Wrap) -> Result<Self, ZError> {
        let mut strm = Box::new(z::z_stream::default());
        let bits = match wrap {
            Wrap::Gzip => 15 + 16,
            Wrap::Raw => -15,
        };
        // SAFETY: `strm` is a freshly defaulted, boxed (pinned in memory) stream with the default
        // allocator; the version string and struct size are the library's own.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        let mut me = Self { strm };
        me.check(rc)?;
        Ok(me)
    }

    fn check(&mut self, rc: i32) -> Result<i32, ZError> {
        if rc >= 0 {
            return Ok(rc);
        }
        let message = if self.strm.msg.is_null() {
            match rc {
                z::Z_DATA_ERROR => "invalid compressed data".to_string(),
                z::Z_MEM_ERROR => "out of memory".to_string(),
                z::Z_BUF_ERROR => "no progress possible".to_string(),
                _ => "stream error".to_string(),
            }
        } else {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string or leaves it null.
            unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        };
        Err(ZError { code: rc, message })
    }

    /// Starts a new stream (next gzip member), keeping the allocated state.
    pub fn reset(&mut self) -> Result<(), ZError> {
        // SAFETY: the stream was initialised by `new`.
        let rc = unsafe { z::inflateReset(&mut *self.strm) };
        self.check(rc).map(|_| ())
    }

    /// Feeds `bits` (1..=7) low bits of `value` before the next input byte.
    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), ZError> {
        // SAFETY: the stream was initialised by `new`; prime only touches its bit buffer.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, i32::from(bits), i32::from(value)) };
        self.check(rc).map(|_| ())
    }

    /// Sets the history window (raw streams) that back-references of the next blocks may use.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), ZError> {
        let len = u32::try_from(dict.len()).map_err(|_| ZError {
            code: z::Z_STREAM_ERROR,
            message: "dictionary too large".into(),
        })?;
        // SAFETY: `dict` is valid for `len` bytes; zlib copies it into its own window.
        let rc = unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), len) };
        self.check(rc).map(|_| ())
    }

    /// Copies the current history window (up to 32 KiB of the latest output) into `out`.
    pub fn dictionary(&self, out: &mut Vec<u8>) -> Result<(), ZError> {
        out.clear();
        out.resize(WINDOW_SIZE, 0);
        let mut len: u32 = 0;
        // SAFETY: `out` is writable for WINDOW_SIZE bytes, the most zlib ever writes here.
        let rc = unsafe { z::inflateGetDictionary(&*self.strm, out.as_mut_ptr(), &mut len) };
        if rc < 0 {
            return Err(ZError {
                code: rc,
                message: "cannot read the inflate window".into(),
            });
        }
        out.truncate((len as usize).min(WINDOW_SIZE));
        Ok(())
    }

    /// Inflates from `input` into `output`. Inputs/outputs above 4 GiB are used partially.
    pub fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: Flush,
    ) -> Result<Step, ZError> {
        let in_len = input.len().min(u32::MAX as usize) as u32;
        let out_len = output.len().min(u32::MAX as usize) as u32;
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len;
        let mode = match flush {
            Flush::None => z::Z_NO_FLUSH,
            Flush::Block => z::Z_BLOCK,
        };
        // SAFETY: next_in/next_out point into live slices of the given lengths for this call;
        // zlib reads at most avail_in and writes at most avail_out bytes.
        let rc = unsafe { z::inflate(&mut *self.strm, mode) };
        let consumed = (in_len - self.strm.avail_in) as usize;
        let produced = (out_len - self.strm.avail_out) as usize;
        // Do not keep pointers into the caller's buffers beyond this call.
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let status = match rc {
            z::Z_STREAM_END => Status::StreamEnd,
            // Z_BUF_ERROR only means "no progress possible now"; callers look at the counts.
            z::Z_OK | z::Z_BUF_ERROR => Status::Ok,
            z::Z_NEED_DICT => {
                return Err(ZError {
                    code: rc,
                    message: "stream needs a preset dictionary".into(),
                });
            }
            other => {
                self.check(other)?;
                return Err(ZError {
                    code: other,
                    message: "unexpected return code".into(),
                });
            }
        };
        Ok(Step {
            consumed,
            produced,
            status,
            data_type: self.strm.data_type,
        })
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is ended exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}
