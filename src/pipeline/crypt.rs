//! The object format: a 60-byte header, then the (optionally zstd-compressed) payload sealed in
//! AES-256-GCM chunks. docs/format.md is the specification; this file implements it.
//!
//! Security properties (each one has a test below):
//! - every object gets its own key, HKDF(data key, random 32-byte salt, context), and the
//!   context binds the header, the repository id and the object's name: a bit flip in the
//!   header, or an object copied under another name or into another repository, fails to
//!   authenticate at its first chunk;
//! - chunk nonces are a STREAM counter plus a last-chunk flag: reordered, dropped, duplicated or
//!   spliced chunks, truncation at any byte (including at a chunk boundary) and trailing bytes
//!   all fail authentication;
//! - since a key encrypts exactly one object, counter nonces are never reused under a key.

use std::io::{self, Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce};
use aws_lc_rs::digest;
use aws_lc_rs::hkdf;
use bytes::Bytes;

use super::keys::{DataKey, KEY_ID_LEN, Keyring, aead_key, expand, push_field, random_bytes};
use super::{CryptError, PipelineError};

pub const MAGIC: &[u8; 8] = b"TIDEMARK";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 60;
pub const TAG_LEN: usize = 16;
pub const SALT_LEN: usize = 32;
/// Accepted plaintext chunk sizes: 4 KiB ..= 16 MiB (bounds a decoder's memory).
pub const MIN_CHUNK_SHIFT: u8 = 12;
pub const MAX_CHUNK_SHIFT: u8 = 24;
/// 1 MiB chunks: the tag overhead is 16 bytes per MiB and memory per stream stays small.
pub const DEFAULT_CHUNK_SHIFT: u8 = 20;

const OBJECT_KEY_INFO: &[u8] = b"tidemark/v1/object";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// What an object is bound to besides its key: the repository it lives in and its name there.
#[derive(Debug, Clone)]
pub struct ObjectContext<'a> {
    pub repository_id: &'a str,
    pub name: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHeader {
    pub compression: Compression,
    pub chunk_shift: u8,
    pub key_id: [u8; KEY_ID_LEN],
    pub salt: [u8; SALT_LEN],
}

impl ObjectHeader {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = FORMAT_VERSION;
        h[9] = self.compression as u8;
        h[10] = self.chunk_shift;
        h[11] = 0;
        h[12..28].copy_from_slice(&self.key_id);
        h[28..60].copy_from_slice(&self.salt);
        h
    }

    pub fn parse(h: &[u8; HEADER_LEN]) -> Result<ObjectHeader, CryptError> {
        if &h[..8] != MAGIC {
            return Err(CryptError::Format(
                "not a tidemark object (bad magic)".into(),
            ));
        }
        if h[8] != FORMAT_VERSION {
            return Err(CryptError::Format(format!(
                "object format version {} is not supported by this tidemark (knows {FORMAT_VERSION})",
                h[8]
            )));
        }
        let compression = match h[9] {
            0 => Compression::None,
            1 => Compression::Zstd,
            c => return Err(CryptError::Format(format!("unknown compression id {c}"))),
        };
        let chunk_shift = h[10];
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift) {
            return Err(CryptError::Format(format!(
                "chunk size 2^{chunk_shift} out of range"
            )));
        }
        if h[11] != 0 {
            return Err(CryptError::Format(
                "reserved header byte is not zero".into(),
            ));
        }
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&h[12..28]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&h[28..60]);
        Ok(ObjectHeader {
            compression,
            chunk_shift,
            key_id,
            salt,
        })
    }

    fn chunk_size(&self) -> usize {
        1usize << self.chunk_shift
    }
}

/// K_obj = HKDF-SHA256(salt, DEK, info = label || len‖repository id || len‖name || header).
fn object_key(
    dek: &DataKey,
    header: &[u8; HEADER_LEN],
    ctx: &ObjectContext<'_>,
) -> Result<LessSafeKey, CryptError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header[28..60]).extract(dek.secret());
    let mut info = OBJECT_KEY_INFO.to_vec();
    push_field(&mut info, ctx.repository_id.as_bytes());
    push_field(&mut info, ctx.name.as_bytes());
    push_field(&mut info, header);
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    expand(&prk, &info, &mut k[..]);
    aead_key(&k)
}

fn chunk_nonce(counter: u32, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Encoding parameters.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// zstd level; `None` stores the payload uncompressed.
    pub zstd_level: Option<i32>,
    pub chunk_shift: u8,
    /// Compute the SHA-256 of the original bytes while encoding.
    pub sha256: bool,
    /// zstd worker threads for this one object (0: compress on the calling thread). For a
    /// single latency-bound object such as a WAL segment; transfers that already run in
    /// parallel leave it at 0.
    pub zstd_workers: u32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            zstd_level: Some(3),
            chunk_shift: DEFAULT_CHUNK_SHIFT,
            sha256: false,
            zstd_workers: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EncodeStats {
    /// Bytes read from the source.
    pub original_bytes: u64,
    /// Bytes of the encoded object (header and tags included).
    pub stored_bytes: u64,
    pub sha256: Option<[u8; 32]>,
}

/// Splits a byte stream into sealed chunks and hands each (and first the header) to `sink`.
///
/// A full chunk is sealed as "not last" only once a byte beyond it arrives, so the final chunk
/// (0..=chunk_size bytes) always carries the last flag, even when the payload is empty.
struct ChunkSealer<F> {
    key: LessSafeKey,
    chunk_size: usize,
    buf: Vec<u8>,
    counter: u32,
    stored: u64,
    sink: F,
}

impl<F: FnMut(Bytes) -> io::Result<()>> ChunkSealer<F> {
    fn seal(&mut self, last: bool) -> io::Result<()> {
        let mut chunk =
            std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size + TAG_LEN));
        let tag = self
            .key
            .seal_in_place_separate_tag(chunk_nonce(self.counter, last), Aad::empty(), &mut chunk)
            .map_err(|_| io::Error::other(CryptError::Random))?;
        chunk.extend_from_slice(tag.as_ref());
        self.counter = self.counter.checked_add(1).ok_or_else(|| {
            io::Error::other(CryptError::Format("object exceeds 2^32 chunks".into()))
        })?;
        self.stored += chunk.len() as u64;
        (self.sink)(Bytes::from(chunk))
    }

    fn finish(mut self) -> io::Result<u64> {
        self.seal(true)?;
        Ok(self.stored)
    }
}

impl<F: FnMut(Bytes) -> io::Result<()>> Write for ChunkSealer<F> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            if self.buf.len() == self.chunk_size {
                self.seal(false)?;
            }
            let take = (self.chunk_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `src` to its end and encodes it as one object, handing encoded bytes to `sink` in
/// order (the header first, then one sealed chunk per call). Memory: one chunk plus the zstd
/// window, whatever the size of `src`.
pub fn encode<R: Read, F: FnMut(Bytes) -> io::Result<()>>(
    mut src: R,
    dek: &DataKey,
    ctx: &ObjectContext<'_>,
    opts: &EncodeOptions,
    mut sink: F,
) -> Result<EncodeStats, PipelineError> {
    if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&opts.chunk_shift) {
        return Err(
            CryptError::Format(format!("chunk size 2^{} out of range", opts.chunk_shift)).into(),
        );
    }
    let mut salt = [0u8; SALT_LEN];
    random_bytes(&mut salt)?;
    let header = ObjectHeader {
        compression: if opts.zstd_level.is_some() {
            Compression::Zstd
        } else {
            Compression::None
        },
        chunk_shift: opts.chunk_shift,
        key_id: *dek.id(),
        salt,
    };
    let header_bytes = header.to_bytes();
    let key = object_key(dek, &header_bytes, ctx)?;
    sink(Bytes::copy_from_slice(&header_bytes)).map_err(PipelineError::from_sink)?;
    let chunk_size = header.chunk_size();
    let sealer = ChunkSealer {
        key,
        chunk_size,
        buf: Vec::with_capacity(chunk_size + TAG_LEN),
        counter: 0,
        stored: HEADER_LEN as u64,
        sink,
    };
    let mut hasher = opts.sha256.then(|| digest::Context::new(&digest::SHA256));
    let mut original = 0u64;
    let mut inbuf = vec![0u8; 256 * 1024];
    let mut pump = |w: &mut dyn Write| -> Result<(), PipelineError> {
        loop {
            let n = match src.read(&mut inbuf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PipelineError::Source(e)),
            };
            original += n as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&inbuf[..n]);
            }
            w.write_all(&inbuf[..n]).map_err(PipelineError::from_sink)?;
        }
    };
    let stored = match opts.zstd_level {
        Some(level) => {
            let mut z = zstd::stream::write::Encoder::new(sealer, level)
                .map_err(PipelineError::from_sink)?;
            // The AEAD already authenticates every byte; a zstd checksum would be redundant work.
            z.include_checksum(false)
                .map_err(PipelineError::from_sink)?;
            if opts.zstd_workers > 0 {
                z.multithread(opts.zstd_workers)
                    .map_err(PipelineError::from_sink)?;
            }
            pump(&mut z)?;
            z.finish().map_err(PipelineError::from_sink)?.finish()
        }
        None => {
            let mut s = sealer;
            pump(&mut s)?;
            s.finish()
        }
    }
    .map_err(PipelineError::from_sink)?;
    Ok(EncodeStats {
        original_bytes: original,
        stored_bytes: stored,
        sha256: hasher.map(|h| {
            let mut out = [0u8; 32];
            out.copy_from_slice(h.finish().as_ref());
            out
        }),
    })
}

/// Opens sealed chunks as they are read: a `Read` over the authenticated (still compressed)
/// payload. It never returns a byte that has not been authenticated.
struct ChunkOpener<R> {
    inner: R,
    key: LessSafeKey,
    sealed_len: usize,
    buf: Vec<u8>,
    plain_len: usize,
    pos: usize,
    counter: u32,
    lookahead: Option<u8>,
    done: bool,
    name: String,
}

impl<R: Read> ChunkOpener<R> {
    fn fail(&self, what: &str) -> io::Error {
        io::Error::other(CryptError::Integrity {
            object: self.name.clone(),
            detail: what.to_string(),
        })
    }

    /// Reads the next sealed chunk and authenticates it. Returns false at the end.
    fn next_chunk(&mut self) -> io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        // Zero-filled once per object: later chunks reuse the buffer as it is.
        self.buf.resize(self.sealed_len, 0);
        let mut got = 0;
        if let Some(b) = self.lookahead.take() {
            self.buf[0] = b;
            got = 1;
        }
        while got < self.sealed_len {
            match self.inner.read(&mut self.buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let last = if got == self.sealed_len {
            let mut one = [0u8; 1];
            loop {
                match self.inner.read(&mut one) {
                    Ok(0) => break true,
                    Ok(_) => {
                        self.lookahead = Some(one[0]);
                        break false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        } else {
            true
        };
        if got < TAG_LEN {
            return Err(self.fail(&format!(
                "truncated: chunk {} has {got} bytes, less than its tag",
                self.counter
            )));
        }
        self.buf.truncate(got);
        let counter = self.counter;
        let opened = self
            .key
            .open_in_place(chunk_nonce(counter, last), Aad::empty(), &mut self.buf)
            .map(|p| p.len());
        let plain_len = match opened {
            Ok(n) => n,
            Err(_) => {
                return Err(self.fail(&format!(
                    "authentication failed at chunk {counter} (corrupted, truncated, extended, \
                     or not the object stored under this name)"
                )));
            }
        };
        if !last && plain_len != self.sealed_len - TAG_LEN {
            return Err(self.fail("chunk shorter than the chunk size before the last chunk"));
        }
        self.counter = counter
            .checked_add(1)
            .ok_or_else(|| self.fail("more than 2^32 chunks"))?;
        self.plain_len = plain_len;
        self.pos = 0;
        self.done = last;
        Ok(true)
    }
}

impl<R: Read> Read for ChunkOpener<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain_len {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = (self.plain_len - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[derive(Debug, Clone, Default)]
pub struct DecodeStats {
    pub stored_bytes: u64,
    pub original_bytes: u64,
    pub sha256: Option<[u8; 32]>,
}

/// Reads the header of an object from `src`.
pub fn read_header<R: Read>(src: &mut R, name: &str) -> Result<ObjectHeader, PipelineError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match src.read(&mut h[got..]) {
            Ok(0) => {
                return Err(CryptError::Integrity {
                    object: name.to_string(),
                    detail: format!(
                        "truncated: {got} bytes, shorter than the {HEADER_LEN}-byte header"
                    ),
                }
                .into());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(PipelineError::Source(e)),
        }
    }
    ObjectHeader::parse(&h).map_err(|e| match e {
        CryptError::Format(detail) => CryptError::Integrity {
            object: name.to_string(),
            detail,
        }
        .into(),
        other => other.into(),
    })
}

/// Decodes one object from `src` into `dst`, authenticating every chunk before any of its bytes
/// reach `dst`. On error, `dst` may have received a prefix of the (authentic) content: callers
/// write into a temporary file and publish it only on success.
pub fn decode<R: Read, W: Write>(
    src: R,
    keyring: &Keyring,
    ctx: &ObjectContext<'_>,
    want_sha256: bool,
    dst: W,
) -> Result<DecodeStats, PipelineError> {
    let mut src = CountingReader {
        inner: src,
        count: 0,
    };
    let header = read_header(&mut src, ctx.name)?;
    let header_bytes = header.to_bytes();
    let dek = keyring
        .get(&header.key_id)
        .ok_or_else(|| CryptError::UnknownKey {
            object: ctx.name.to_string(),
            key_id: hex::encode(header.key_id),
        })?;
    let key = object_key(dek, &header_bytes, ctx)?;
    let chunk_size = header.chunk_size();
    let opener = ChunkOpener {
        inner: SourceTag(&mut src),
        key,
        sealed_len: chunk_size + TAG_LEN,
        buf: Vec::with_capacity(chunk_size + TAG_LEN),
        plain_len: 0,
        pos: 0,
        counter: 0,
        lookahead: None,
        done: false,
        name: ctx.name.to_string(),
    };
    let mut out = HashingWriter {
        inner: dst,
        hasher: want_sha256.then(|| digest::Context::new(&digest::SHA256)),
        count: 0,
    };
    let copy_result = match header.compression {
        Compression::None => copy(opener, &mut out),
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(opener).map_err(PipelineError::from_sink)?;
            copy(dec, &mut out)
        }
    };
    copy_result.map_err(|e| PipelineError::classify(e, ctx.name))?;
    Ok(DecodeStats {
        stored_bytes: src.count,
        original_bytes: out.count,
        sha256: out.hasher.map(|h| {
            let mut o = [0u8; 32];
            o.copy_from_slice(h.finish().as_ref());
            o
        }),
    })
}

fn copy<R: Read, W: Write>(mut r: R, w: &mut W) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])
            .map_err(|e| io::Error::other(Tagged::Sink(e)))?;
    }
}

/// Marks which side of the pipeline an I/O error came from, so the caller can tell a broken
/// source (store), a broken sink (local disk) and a failed authentication apart.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Tagged {
    #[error("{0}")]
    Source(io::Error),
    #[error("{0}")]
    Sink(io::Error),
}

struct SourceTag<R>(R);
impl<R: Read> Read for SourceTag<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| io::Error::other(Tagged::Source(e)))
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}
impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Option<digest::Context>,
    count: u64,
}
impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
