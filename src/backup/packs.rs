//! The pack format, writing side (docs/format.md, section 4): files grouped into pack
//! objects, each pack's pieces read back to back by a `PackReader` that hashes every piece,
//! and the manifest's extents built from what was actually read.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;

use crate::error::Error;
use crate::parallel::run_bounded;
use crate::pipeline::{EncodeOptions, Keyring};
use crate::progress::Progress;
use crate::repo::manifest::{Extent, PackEntry};
use crate::repo::{ClusterInfo, Repository, layout};

/// Files up to this size share packs; larger files are cut into pieces of this size, each its
/// own pack, so one large relation does not serialise the backup.
pub const PACK_TARGET: u64 = 64 << 20;
/// At most this many files in one pack (bounds manifest work per pack on restore).
const PACK_MAX_FILES: usize = 4096;

/// `length` bytes at `offset` of source file number `file`.
#[derive(Debug, Clone)]
pub(super) struct Piece {
    pub file: usize,
    pub source: PathBuf,
    pub offset: u64,
    pub length: u64,
}

/// What was read of piece number `piece` of a pack, and where it landed in the pack.
#[derive(Debug, Clone)]
struct PieceResult {
    piece: usize,
    pack_offset: u64,
    length: u64,
    sha256: [u8; 32],
}

/// Reads the pieces of one pack back to back, hashing each; records what it actually read
/// (a file may shrink or vanish during the backup: WAL replay repairs that).
struct PackReader {
    pieces: Vec<Piece>,
    next: usize,
    file: Option<File>,
    remaining: u64,
    read_in_piece: u64,
    start_in_pack: u64,
    pack_offset: u64,
    hasher: Option<digest::Context>,
    results: Arc<Mutex<Vec<PieceResult>>>,
    progress: Arc<AtomicU64>,
}

impl PackReader {
    fn new(
        pieces: Vec<Piece>,
        results: Arc<Mutex<Vec<PieceResult>>>,
        progress: Arc<AtomicU64>,
    ) -> PackReader {
        PackReader {
            pieces,
            next: 0,
            file: None,
            remaining: 0,
            read_in_piece: 0,
            start_in_pack: 0,
            pack_offset: 0,
            hasher: None,
            results,
            progress,
        }
    }

    fn finish_piece(&mut self) {
        let h = self.hasher.take().map(|h| h.finish());
        let mut sha = [0u8; 32];
        if let Some(h) = h {
            sha.copy_from_slice(h.as_ref());
        }
        if let Ok(mut r) = self.results.lock() {
            r.push(PieceResult {
                piece: self.next - 1,
                pack_offset: self.start_in_pack,
                length: self.read_in_piece,
                sha256: sha,
            });
        }
        self.file = None;
    }
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.file.is_none() {
                let Some(piece) = self.pieces.get(self.next) else {
                    return Ok(0);
                };
                self.next += 1;
                let mut f = match File::open(&piece.source) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // dropped meanwhile
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{}: {e}", piece.source.display()),
                        ));
                    }
                };
                f.seek(SeekFrom::Start(piece.offset))?;
                self.remaining = piece.length;
                self.read_in_piece = 0;
                self.start_in_pack = self.pack_offset;
                self.hasher = Some(digest::Context::new(&digest::SHA256));
                self.file = Some(f);
                if self.remaining == 0 {
                    self.finish_piece();
                    continue;
                }
            }
            let want = (buf.len() as u64).min(self.remaining) as usize;
            let n = match self.file.as_mut() {
                Some(f) => f.read(&mut buf[..want])?,
                None => 0,
            };
            if n == 0 {
                self.finish_piece(); // shorter than when listed
                continue;
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&buf[..n]);
            }
            self.remaining -= n as u64;
            self.read_in_piece += n as u64;
            self.pack_offset += n as u64;
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
            if self.remaining == 0 {
                self.finish_piece();
            }
            return Ok(n);
        }
    }
}

/// What one pack transfer produced.
pub(super) struct PackDone {
    pack_id: u32,
    pieces: Vec<Piece>,
    results: Vec<PieceResult>,
    original: u64,
    stored: u64,
}

/// Groups pieces into packs: small files share packs up to PACK_TARGET bytes, large files are
/// cut into PACK_TARGET pieces, one pack each. `files` are (source, size); a piece's `file` is
/// the index into it.
pub(super) fn plan_packs(files: &[(PathBuf, u64)]) -> Vec<Vec<Piece>> {
    let mut packs = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, (source, size)) in files.iter().enumerate() {
        if *size > PACK_TARGET {
            let mut off = 0;
            while off < *size {
                let len = (*size - off).min(PACK_TARGET);
                packs.push(vec![Piece {
                    file: i,
                    source: source.clone(),
                    offset: off,
                    length: len,
                }]);
                off += len;
            }
            continue;
        }
        if *size == 0 {
            continue; // recorded in the manifest without extents
        }
        if current_bytes + size > PACK_TARGET || current.len() >= PACK_MAX_FILES {
            packs.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(Piece {
            file: i,
            source: source.clone(),
            offset: 0,
            length: *size,
        });
        current_bytes += size;
    }
    if !current.is_empty() {
        packs.push(current);
    }
    packs
}

/// Where the packs of one backup go.
pub(super) struct PackTarget<'a> {
    pub repo: &'a Repository,
    pub info: &'a ClusterInfo,
    pub keyring: &'a Arc<Keyring>,
    pub encode: EncodeOptions,
    pub backup_id: &'a str,
}

/// Uploads `packs` (pack N is object `layout::pack(backup_id, N)`), `parallelism` at a time,
/// counting the bytes read into `progress`.
pub(super) async fn upload(
    to: &PackTarget<'_>,
    packs: Vec<Vec<Piece>>,
    parallelism: usize,
    progress: &Progress,
) -> Result<Vec<PackDone>, Error> {
    let jobs = packs.into_iter().enumerate().map(|(pack_id, pieces)| {
        let pack_id = pack_id as u32;
        let repo = to.repo.clone();
        let obj = repo.object(to.info, layout::pack(to.backup_id, pack_id));
        let keyring = to.keyring.clone();
        let encode = to.encode;
        let counter = progress.counter();
        async move {
            let piece_results = Arc::new(Mutex::new(Vec::new()));
            let reader = PackReader::new(pieces.clone(), piece_results.clone(), counter);
            let stats = repo.put_object(&obj, &keyring, encode, reader).await?;
            let results = piece_results
                .lock()
                .map_err(|_| Error::Internal("a pack reader panicked".into()))?
                .clone();
            Ok(PackDone {
                pack_id,
                pieces,
                results,
                original: stats.original_bytes,
                stored: stats.stored_bytes,
            })
        }
    });
    run_bounded(jobs, parallelism).await
}

/// The packs as the manifest lists them, and what they hold.
pub(super) struct Packed {
    /// The extents read of each source file (indexed like `plan_packs`' input), unsorted.
    pub extents: Vec<Vec<Extent>>,
    /// Sorted by id.
    pub packs: Vec<PackEntry>,
    pub stored_bytes: u64,
}

/// Collects what the transfers read into per-file extents (a piece nothing was read of has
/// none).
pub(super) fn collect(done: Vec<PackDone>, files: usize) -> Packed {
    let mut extents: Vec<Vec<Extent>> = vec![Vec::new(); files];
    let mut packs = Vec::new();
    let mut stored_bytes = 0;
    for PackDone {
        pack_id,
        pieces,
        results,
        original,
        stored,
    } in done
    {
        stored_bytes += stored;
        packs.push(PackEntry {
            id: pack_id,
            original_bytes: original,
            stored_bytes: stored,
        });
        for r in results {
            let piece = &pieces[r.piece];
            if r.length == 0 {
                continue;
            }
            extents[piece.file].push(Extent {
                pack: pack_id,
                pack_offset: r.pack_offset,
                file_offset: piece.offset,
                length: r.length,
                sha256: hex::encode(r.sha256),
            });
        }
    }
    packs.sort_by_key(|p| p.id);
    Packed {
        extents,
        packs,
        stored_bytes,
    }
}

/// The extents of a file as read, up to the first hole, and the size they cover; None when
/// nothing of a non-empty file was read (it vanished).
///
/// A file that shrank while its pieces were read in parallel can leave a hole (a short piece
/// followed by a full one read earlier). Keep the prefix up to the first hole: the file was
/// that long at some moment of the backup, and WAL replay (from the backup's checkpoint, with
/// full-page writes) rebuilds what follows. The manifest's extents then always cover 0..size
/// exactly.
pub(super) fn contiguous_prefix(
    mut ext: Vec<Extent>,
    listed_size: u64,
) -> Option<(u64, Vec<Extent>)> {
    ext.sort_by_key(|e| e.file_offset);
    let mut end = 0;
    let contiguous = ext
        .iter()
        .take_while(|e| {
            let ok = e.file_offset == end;
            end = e.file_offset + e.length;
            ok
        })
        .count();
    ext.truncate(contiguous);
    if listed_size > 0 && ext.is_empty() {
        return None;
    }
    let size = ext
        .iter()
        .map(|e| e.file_offset + e.length)
        .max()
        .unwrap_or(0);
    Some((size, ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_group_small_files_and_cut_large_ones() {
        let files = vec![
            (PathBuf::from("a"), 10),
            (PathBuf::from("b"), 0),
            (PathBuf::from("c"), PACK_TARGET * 2 + 5),
            (PathBuf::from("d"), PACK_TARGET - 5),
            (PathBuf::from("e"), 20),
        ];
        let packs = plan_packs(&files);
        let shape: Vec<Vec<(usize, u64, u64)>> = packs
            .iter()
            .map(|p| p.iter().map(|x| (x.file, x.offset, x.length)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(2, 0, PACK_TARGET)],
                vec![(2, PACK_TARGET, PACK_TARGET)],
                vec![(2, 2 * PACK_TARGET, 5)],
                // a pack never exceeds the target: d does not fit beside a, e not beside d
                vec![(0, 0, 10)],
                vec![(3, 0, PACK_TARGET - 5)],
                vec![(4, 0, 20)],
            ]
        );
    }

    #[test]
    fn pack_reader_records_short_and_vanished_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("c"), b"xy").unwrap();
        let pieces = vec![
            Piece {
                file: 0,
                source: d.path().join("a"),
                offset: 0,
                length: 5,
            },
            Piece {
                file: 1,
                source: d.path().join("gone"),
                offset: 0,
                length: 9,
            },
            Piece {
                file: 2,
                source: d.path().join("c"),
                offset: 0,
                length: 4,
            }, // shrank
        ];
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut r = PackReader::new(pieces, results.clone(), Arc::new(AtomicU64::new(0)));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"helloxy");
        let res = results.lock().unwrap().clone();
        let got: Vec<(usize, u64, u64)> = res
            .iter()
            .map(|x| (x.piece, x.pack_offset, x.length))
            .collect();
        assert_eq!(got, vec![(0, 0, 5), (2, 5, 2)]);
        assert_eq!(
            hex::encode(res[1].sha256),
            hex::encode(digest::digest(&digest::SHA256, b"xy"))
        );
    }
}
