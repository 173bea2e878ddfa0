//! CPU throughput of the tidemark byte pipeline against plain zstd, on real PostgreSQL files.
//!
//! ```text
//! cargo run --release --example bench_pipeline -- [--reps N] [--piece-mib M] \
//!     --rel RELATION_FILES... --wal WAL_SEGMENTS... [--group NAME FILES...]...
//! ```
//!
//! The files are read into memory once, so only CPU work is measured (no disk, no store). Each
//! group (relation files, WAL segments, any further `--group`) is measured separately:
//!
//! - (a) plain zstd level 3, `zstd::stream::write::Encoder` (the baseline: the same streaming
//!   API tidemark uses);
//! - (a') plain zstd level 3 in one call with the whole input (`ZSTD_compress`, size known, no
//!   window buffer copy: what `zstd -b3` measures);
//! - (b) `tidemark::pipeline::encode`: zstd level 3, then AES-256-GCM in 1 MiB chunks;
//! - (c) plain zstd decompression, `zstd::stream::read::Decoder`;
//! - (d) `tidemark::pipeline::decode`;
//! - (e) AES-256-GCM seal of 1 MiB chunks in place: aws-lc-rs `LessSafeKey` (what tidemark
//!   uses) versus the RustCrypto `aes-gcm` 0.11 crate.
//!
//! Every measurement runs with 1 thread and with 2 threads. With 2 threads the work items are
//! split (greedily, by size) across two std threads that start together; the figure is the
//! aggregate: all bytes divided by the wall time until the last thread finished. Work items are
//! the files cut into pieces of at most `--piece-mib` MiB (default 32), so that one big
//! relation file does not leave the second thread idle; zstd level 3 uses a window of at most
//! 2 MiB, so the cut does not change the ratio measurably. WAL segments (16 MiB) stay whole.
//!
//! Each measurement is repeated `--reps` times (default 5) after one untimed warm-up run, the
//! operations interleaved within each repetition (a a' b c d e e, a a' b c d e e, ...) so that a
//! change in background load does not favour one of them. The table shows the MEDIAN wall time
//! as MB/s (10^6 bytes of ORIGINAL data per second, also for decoding and for AES), with the
//! best run in brackets. "Overhead" compares median times, (t_tidemark / t_zstd - 1) × 100;
//! the `summary:` line also has it for the best times.
//!
//! Lines starting with `summary:` are meant for scripts (scripts/bench-pipeline).

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use tidemark::pipeline::{EncodeOptions, Keyring, MasterKey, ObjectContext, decode, encode};

const ZSTD_LEVEL: i32 = 3;
/// tidemark's default chunk size (2^20 = 1 MiB), also the AES-only chunk size.
const CHUNK_SHIFT: u8 = 20;
const AES_CHUNK: usize = 1 << CHUNK_SHIFT;
/// The read/write buffer size tidemark's pipeline uses; the baselines use the same.
const IO_BUF: usize = 256 * 1024;
const REPO: &str = "bench-repo";

/// A named set of input files, measured (and reported) on its own.
struct FileSet {
    /// Short name, also used in the `summary:` lines.
    key: String,
    label: String,
    paths: Vec<PathBuf>,
}

struct Args {
    sets: Vec<FileSet>,
    reps: usize,
    piece: usize,
}

fn usage() -> String {
    "usage: bench_pipeline [--reps N] [--piece-mib M] --rel FILES... --wal FILES... \
     [--group NAME FILES...]..."
        .to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sets: Vec::new(),
        reps: 5,
        piece: 32 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let new_set = |key: &str, label: &str| FileSet {
            key: key.to_string(),
            label: label.to_string(),
            paths: Vec::new(),
        };
        match a.as_str() {
            "--rel" => args.sets.push(new_set("rel", "relation files")),
            "--wal" => args.sets.push(new_set("wal", "WAL segments")),
            "--group" => {
                let name = it
                    .next()
                    .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))
                    .ok_or_else(|| format!("--group needs a NAME\n{}", usage()))?;
                args.sets.push(new_set(&name, &name));
            }
            "--reps" | "--piece-mib" => {
                let v: usize = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&v| v > 0)
                    .ok_or_else(|| format!("{a} needs a positive number\n{}", usage()))?;
                if a == "--reps" {
                    args.reps = v;
                } else {
                    args.piece = v << 20;
                }
            }
            "-h" | "--help" => return Err(usage()),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}\n{}", usage())),
            _ => match args.sets.last_mut() {
                Some(set) => set.paths.push(a.into()),
                None => {
                    return Err(format!(
                        "{a}: say --rel, --wal or --group first\n{}",
                        usage()
                    ));
                }
            },
        }
    }
    args.sets.retain(|s| !s.paths.is_empty());
    if args.sets.is_empty() {
        return Err(usage());
    }
    Ok(args)
}

/// A `Write` that only counts (the output of every measurement is thrown away).
#[derive(Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `r` to its end into `w` through an `IO_BUF` buffer (as tidemark's decoder does).
fn pump(mut r: impl Read, w: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => w.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// (a): plain zstd stream compression, fed `IO_BUF` at a time like tidemark's encoder.
fn zstd_compress(data: &[u8], out: impl Write) -> io::Result<()> {
    let mut z = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
    for piece in data.chunks(IO_BUF) {
        z.write_all(piece)?;
    }
    z.finish()?;
    Ok(())
}

/// (c): plain zstd stream decompression, straight from the in-memory frame.
fn zstd_decompress(frame: &[u8], out: &mut impl Write) -> io::Result<()> {
    pump(zstd::stream::read::Decoder::with_buffer(frame)?, out)
}

fn tidemark_opts() -> EncodeOptions {
    EncodeOptions {
        zstd_level: Some(ZSTD_LEVEL),
        chunk_shift: CHUNK_SHIFT,
        sha256: false,
        zstd_workers: 0,
    }
}

/// The object name each work item is encoded under (bound into its encryption).
fn object_name(i: usize) -> String {
    format!("bench/{i:06}")
}

/// (b): tidemark encode; returns the stored size.
fn tidemark_encode(ring: &Keyring, name: &str, data: &[u8], mut out: impl FnMut(&[u8])) -> u64 {
    let c = ObjectContext {
        repository_id: REPO,
        name,
    };
    encode(data, ring.current(), &c, &tidemark_opts(), |chunk| {
        out(&chunk);
        Ok(())
    })
    .expect("tidemark encode")
    .stored_bytes
}

/// (d): tidemark decode.
fn tidemark_decode(ring: &Keyring, name: &str, obj: &[u8], out: &mut impl Write) {
    let c = ObjectContext {
        repository_id: REPO,
        name,
    };
    decode(obj, ring, &c, false, out).expect("tidemark decode");
}

/// Splits items (by their sizes) into `n` buckets of about equal total size: largest first,
/// each into the currently lightest bucket.
fn split(sizes: &[u64], n: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut buckets = vec![(0u64, Vec::new()); n];
    for i in order {
        let b = buckets.iter_mut().min_by_key(|b| b.0).unwrap();
        b.0 += sizes[i];
        b.1.push(i);
    }
    buckets.into_iter().map(|b| b.1).collect()
}

/// The measured operations, in table order: (label, key in the `summary:` line).
const OPS: [(&str, &str); 7] = [
    ("(a) zstd -3 compress, stream (zstd crate)", "zstd_enc"),
    ("(a') zstd -3 compress, one-shot (bulk)", "zstd_bulk"),
    ("(b) tidemark encode (zstd-3 + GCM)", "tm_enc"),
    ("(c) zstd decompress (zstd crate)", "zstd_dec"),
    ("(d) tidemark decode", "tm_dec"),
    ("(e) AES-256-GCM seal 1 MiB: aws-lc-rs", "awslc_gcm"),
    ("(e) AES-256-GCM seal 1 MiB: aes-gcm 0.11", "aesgcm"),
];
const ZSTD_ENC: usize = 0;
const ZSTD_BULK: usize = 1;
const TM_ENC: usize = 2;
const ZSTD_DEC: usize = 3;
const TM_DEC: usize = 4;
const AWS_LC: usize = 5;
const RUST_CRYPTO: usize = 6;

/// What every operation reads (shared by the threads).
struct Inputs<'a> {
    items: &'a [Vec<u8>],
    names: Vec<String>,
    /// Plain zstd frames of the items (input of (c)).
    frames: Vec<Vec<u8>>,
    /// tidemark objects of the items (input of (d)).
    objects: Vec<Vec<u8>>,
    ring: &'a Keyring,
    aws_lc: LessSafeKey,
    rust_crypto: aes_gcm::Aes256Gcm,
}

/// One thread's share: its items, and its own copies of them that (e) seals in place (the same
/// buffers again on every repetition: AES-GCM throughput does not depend on the plaintext).
struct Share {
    items: Vec<usize>,
    own: Vec<Vec<u8>>,
    /// Output buffer of the one-shot compression, large enough for its largest item.
    bulk_out: Vec<u8>,
}

fn run_op(op: usize, inp: &Inputs<'_>, share: &mut Share) {
    match op {
        ZSTD_ENC => {
            for &i in &share.items {
                zstd_compress(&inp.items[i], Counter::default()).unwrap();
            }
        }
        ZSTD_BULK => {
            // One call with the whole input: the source size is known up front and there is no
            // streaming window buffer (what `zstd -b3` measures).
            for &i in &share.items {
                let d = &inp.items[i];
                let n = zstd::zstd_safe::compress(&mut share.bulk_out[..], d, ZSTD_LEVEL).unwrap();
                std::hint::black_box(n);
            }
        }
        TM_ENC => {
            for &i in &share.items {
                let mut sink = 0usize;
                tidemark_encode(inp.ring, &inp.names[i], &inp.items[i], |c| sink += c.len());
                std::hint::black_box(sink);
            }
        }
        ZSTD_DEC => {
            for &i in &share.items {
                zstd_decompress(&inp.frames[i], &mut Counter::default()).unwrap();
            }
        }
        TM_DEC => {
            for &i in &share.items {
                tidemark_decode(
                    inp.ring,
                    &inp.names[i],
                    &inp.objects[i],
                    &mut Counter::default(),
                );
            }
        }
        AWS_LC | RUST_CRYPTO => {
            let mut counter = 0u32;
            for chunk in share.own.iter_mut().flat_map(|b| b.chunks_mut(AES_CHUNK)) {
                let mut nonce = [0u8; NONCE_LEN];
                nonce[8..].copy_from_slice(&counter.to_be_bytes());
                counter = counter.wrapping_add(1);
                if op == AWS_LC {
                    let tag = inp
                        .aws_lc
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce),
                            Aad::empty(),
                            chunk,
                        )
                        .unwrap();
                    std::hint::black_box(&tag);
                } else {
                    let tag = inp
                        .rust_crypto
                        .encrypt_inout_detached(&nonce.into(), b"", chunk.into())
                        .unwrap();
                    std::hint::black_box(&tag);
                }
            }
        }
        _ => unreachable!(),
    }
}

/// Runs every operation over all items, the items split across `threads` threads: `reps` timed
/// repetitions after one warm-up. Within a repetition the operations run one after the other
/// (interleaved), so a change in background load hits all of them alike instead of one.
/// Returns, per operation, the wall time of every timed repetition: from the first thread's
/// start to the last thread's end. (Each thread reads the clock itself: a coordinating thread
/// may be scheduled late on a busy machine and would miss part of the work.)
fn measure(inp: &Inputs<'_>, threads: usize, reps: usize) -> Vec<Vec<Duration>> {
    let sizes: Vec<u64> = inp.items.iter().map(|d| d.len() as u64).collect();
    let buckets = split(&sizes, threads);
    let start = Barrier::new(threads);
    // spans[thread][rep][op]
    let spans: Vec<Vec<Vec<(Instant, Instant)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = buckets
            .into_iter()
            .map(|items| {
                let start = &start;
                s.spawn(move || {
                    let own: Vec<Vec<u8>> = items.iter().map(|&i| inp.items[i].clone()).collect();
                    let largest = own.iter().map(Vec::len).max().unwrap_or(0);
                    let bulk_out = vec![0u8; zstd::zstd_safe::compress_bound(largest)];
                    let mut share = Share {
                        items,
                        own,
                        bulk_out,
                    };
                    (0..=reps)
                        .map(|_| {
                            (0..OPS.len())
                                .map(|op| {
                                    // Everyone waits for the slowest thread of the previous op.
                                    start.wait();
                                    let t = Instant::now();
                                    run_op(op, inp, &mut share);
                                    (t, Instant::now())
                                })
                                .collect()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (0..OPS.len())
        .map(|op| {
            // Repetition 0 is the warm-up.
            (1..=reps)
                .map(|r| {
                    let first = spans.iter().map(|s| s[r][op].0).min().unwrap();
                    let last = spans.iter().map(|s| s[r][op].1).max().unwrap();
                    last - first
                })
                .collect()
        })
        .collect()
}

/// Median and best of a set of wall times.
#[derive(Clone, Copy)]
struct Timing {
    median: Duration,
    best: Duration,
}

impl Timing {
    fn of(mut v: Vec<Duration>) -> Timing {
        v.sort();
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2
        };
        Timing { median, best: v[0] }
    }

    fn mbps(d: Duration, bytes: u64) -> f64 {
        bytes as f64 / 1e6 / d.as_secs_f64()
    }
}

/// One row of the table: a timing with 1 and with 2 threads.
struct Row {
    label: &'static str,
    t: [Timing; 2],
}

struct Group {
    label: String,
    key: String,
    files: usize,
    /// Work items (file pieces).
    items: Vec<Vec<u8>>,
    total: u64,
}

fn load(set: &FileSet, piece: usize) -> Group {
    let mut items = Vec::new();
    let mut total = 0u64;
    for p in &set.paths {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        total += data.len() as u64;
        if data.len() <= piece {
            items.push(data);
        } else {
            items.extend(data.chunks(piece).map(<[u8]>::to_vec));
        }
    }
    Group {
        label: set.label.clone(),
        key: set.key.clone(),
        files: set.paths.len(),
        items,
        total,
    }
}

fn bench_group(g: &Group, ring: &Keyring, reps: usize) -> Vec<Row> {
    let names: Vec<String> = (0..g.items.len()).map(object_name).collect();

    // Untimed inputs for decoding, checked once for a correct round trip.
    let frames: Vec<Vec<u8>> = g
        .items
        .iter()
        .map(|d| {
            let mut f = Vec::new();
            zstd_compress(d, &mut f).unwrap();
            f
        })
        .collect();
    let objects: Vec<Vec<u8>> = g
        .items
        .iter()
        .zip(&names)
        .map(|(d, n)| {
            let mut o = Vec::new();
            tidemark_encode(ring, n, d, |c| o.extend_from_slice(c));
            o
        })
        .collect();
    for (i, d) in g.items.iter().enumerate() {
        let mut back = Vec::with_capacity(d.len());
        zstd_decompress(&frames[i], &mut back).unwrap();
        assert!(back == *d, "zstd round trip failed");
        back.clear();
        tidemark_decode(ring, &names[i], &objects[i], &mut back);
        assert!(back == *d, "tidemark round trip failed");
    }
    let zstd_bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let tm_bytes: u64 = objects.iter().map(|o| o.len() as u64).sum();
    println!(
        "\n== {}: {} files, {:.1} MB in {} work items; zstd -3 ratio {:.2} ({:.1} MB), \
         tidemark ratio {:.2} ({:.1} MB, {:+.3} % size vs zstd)",
        g.label,
        g.files,
        g.total as f64 / 1e6,
        g.items.len(),
        g.total as f64 / zstd_bytes as f64,
        zstd_bytes as f64 / 1e6,
        g.total as f64 / tm_bytes as f64,
        tm_bytes as f64 / 1e6,
        (tm_bytes as f64 / zstd_bytes as f64 - 1.0) * 100.0
    );

    let key_bytes = [0x5au8; 32];
    let inp = Inputs {
        items: &g.items,
        names,
        frames,
        objects,
        ring,
        aws_lc: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).unwrap()),
        rust_crypto: aes_gcm::Aes256Gcm::new(&key_bytes.into()),
    };
    let one = measure(&inp, 1, reps);
    let two = measure(&inp, 2, reps);
    OPS.iter()
        .zip(one.into_iter().zip(two))
        .map(|((label, _), (a, b))| Row {
            label,
            t: [Timing::of(a), Timing::of(b)],
        })
        .collect()
}

fn print_table(g: &Group, rows: &[Row]) {
    let mbps = |t: Timing| {
        format!(
            "{:>7.1} [{:>7.1}]",
            Timing::mbps(t.median, g.total),
            Timing::mbps(t.best, g.total)
        )
    };
    // Time overhead of row `i` over row `base`, in %, from the median or the best times.
    let pct = |i: usize, base: usize, k: usize, f: fn(&Timing) -> Duration| {
        (f(&rows[i].t[k]).as_secs_f64() / f(&rows[base].t[k]).as_secs_f64() - 1.0) * 100.0
    };
    println!(
        "{:<42} {:>17} {:>17}",
        "MB/s of original bytes: median [best]", "1 thread", "2 threads"
    );
    for (i, r) in rows.iter().enumerate() {
        println!("{:<42} {} {}", r.label, mbps(r.t[0]), mbps(r.t[1]));
        let bases: &[(usize, &str)] = match i {
            TM_ENC => &[(ZSTD_ENC, "stream (a)"), (ZSTD_BULK, "one-shot (a')")],
            TM_DEC => &[(ZSTD_DEC, "(c)")],
            _ => &[],
        };
        for &(base, name) in bases {
            println!(
                "{:<42} {:>16.1}% {:>16.1}%",
                format!("    tidemark time overhead vs {name}"),
                pct(i, base, 0, |t| t.median),
                pct(i, base, 1, |t| t.median)
            );
        }
    }
    // Machine-readable: every figure, median and best, plus the overheads both ways.
    let mut line = format!("summary: {} bytes={}", g.key, g.total);
    for (r, (_, key)) in rows.iter().zip(OPS) {
        for (k, th) in ["1t", "2t"].iter().enumerate() {
            line.push_str(&format!(
                " {key}_{th}={:.1} {key}_{th}_best={:.1}",
                Timing::mbps(r.t[k].median, g.total),
                Timing::mbps(r.t[k].best, g.total)
            ));
        }
    }
    for (name, i, base) in [
        ("enc", TM_ENC, ZSTD_ENC),
        ("enc_bulk", TM_ENC, ZSTD_BULK),
        ("dec", TM_DEC, ZSTD_DEC),
    ] {
        for (k, th) in ["1t", "2t"].iter().enumerate() {
            line.push_str(&format!(
                " {name}_overhead_{th}_pct={:.1} {name}_overhead_{th}_best_pct={:.1}",
                pct(i, base, k, |t| t.median),
                pct(i, base, k, |t| t.best)
            ));
        }
    }
    println!("{line}");
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let (ring, _file) =
        Keyring::create(&MasterKey::from_bytes(&[7u8; 32]), REPO).expect("create keyring");
    println!(
        "tidemark pipeline benchmark: zstd level {ZSTD_LEVEL}, {} KiB GCM chunks, {} timed runs \
         after 1 warm-up; table shows the MEDIAN run, best in brackets",
        AES_CHUNK >> 10,
        args.reps
    );
    for set in &args.sets {
        let g = load(set, args.piece);
        let rows = bench_group(&g, &ring, args.reps);
        print_table(&g, &rows);
    }
    ExitCode::SUCCESS
}
