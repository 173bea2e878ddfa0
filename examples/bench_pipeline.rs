//! CPU throughput of the tidemark byte pipeline against plain zstd, on real PostgreSQL files.
//!
//! ```text
//! cargo run --release --example bench_pipeline -- [--reps N] [--piece-mib M] \
//!     --rel RELATION_FILES... --wal WAL_SEGMENTS...
//! ```
//!
//! The files are read into memory once, so only CPU work is measured (no disk, no store). Each
//! group (relation files, WAL segments) is measured separately:
//!
//! - (a) plain zstd level 3, `zstd::stream::write::Encoder` (the baseline);
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
//! Each measurement is repeated `--reps` times (default 5) after one untimed warm-up run; the
//! table shows the MEDIAN wall time as MB/s (10^6 bytes of ORIGINAL data per second, also for
//! decoding and for AES), with the best run in brackets. "Overhead" compares median times:
//! (t_tidemark / t_zstd - 1) × 100.
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

struct Args {
    rel: Vec<PathBuf>,
    wal: Vec<PathBuf>,
    reps: usize,
    piece: usize,
}

fn usage() -> String {
    "usage: bench_pipeline [--reps N] [--piece-mib M] --rel FILES... --wal FILES...".to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rel: Vec::new(),
        wal: Vec::new(),
        reps: 5,
        piece: 32 << 20,
    };
    let mut group: Option<bool> = None; // Some(true): --rel, Some(false): --wal
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rel" => group = Some(true),
            "--wal" => group = Some(false),
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
            _ => match group {
                Some(true) => args.rel.push(a.into()),
                Some(false) => args.wal.push(a.into()),
                None => return Err(format!("{a}: say --rel or --wal first\n{}", usage())),
            },
        }
    }
    if args.rel.is_empty() && args.wal.is_empty() {
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

/// Runs `work` over every item, the items split across `threads` threads, `reps` timed times
/// after one warm-up. `prepare` builds each thread's private state from its items (untimed).
/// Returns the wall time of every timed repetition.
fn measure<T, S, P, W>(
    items: &[T],
    sizes: &[u64],
    threads: usize,
    reps: usize,
    prepare: P,
    work: W,
) -> Vec<Duration>
where
    T: Sync,
    P: Fn(&[(usize, &T)]) -> S + Sync,
    W: Fn(&mut S) + Sync,
{
    let buckets = split(sizes, threads);
    let start = Barrier::new(threads + 1);
    let end = Barrier::new(threads + 1);
    let mut times = Vec::with_capacity(reps);
    std::thread::scope(|s| {
        for b in &buckets {
            let (start, end, prepare, work) = (&start, &end, &prepare, &work);
            let mine: Vec<(usize, &T)> = b.iter().map(|&i| (i, &items[i])).collect();
            s.spawn(move || {
                let mut state = prepare(&mine);
                for _ in 0..=reps {
                    start.wait();
                    work(&mut state);
                    end.wait();
                }
            });
        }
        for rep in 0..=reps {
            start.wait();
            let t = Instant::now();
            end.wait();
            if rep > 0 {
                times.push(t.elapsed()); // rep 0 is the warm-up
            }
        }
    });
    times
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
    label: &'static str,
    key: &'static str,
    files: usize,
    /// Work items (file pieces).
    items: Vec<Vec<u8>>,
    total: u64,
}

fn load(label: &'static str, key: &'static str, paths: &[PathBuf], piece: usize) -> Group {
    let mut items = Vec::new();
    let mut total = 0u64;
    for p in paths {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        total += data.len() as u64;
        if data.len() <= piece {
            items.push(data);
        } else {
            items.extend(data.chunks(piece).map(<[u8]>::to_vec));
        }
    }
    Group {
        label,
        key,
        files: paths.len(),
        items,
        total,
    }
}

fn bench_group(g: &Group, ring: &Keyring, reps: usize) -> Vec<Row> {
    let sizes: Vec<u64> = g.items.iter().map(|d| d.len() as u64).collect();
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

    let both = |f: &dyn Fn(usize) -> Vec<Duration>| [Timing::of(f(1)), Timing::of(f(2))];
    let idx = |mine: &[(usize, &Vec<u8>)]| -> Vec<usize> { mine.iter().map(|m| m.0).collect() };

    let mut rows = Vec::new();
    rows.push(Row {
        label: "(a) zstd -3 compress (zstd crate)",
        t: both(&|n| {
            measure(&g.items, &sizes, n, reps, idx, |mine| {
                for &i in mine.iter() {
                    zstd_compress(&g.items[i], Counter::default()).unwrap();
                }
            })
        }),
    });
    rows.push(Row {
        label: "(b) tidemark encode (zstd-3 + GCM)",
        t: both(&|n| {
            measure(&g.items, &sizes, n, reps, idx, |mine| {
                for &i in mine.iter() {
                    let mut sink = 0usize;
                    tidemark_encode(ring, &names[i], &g.items[i], |c| sink += c.len());
                    std::hint::black_box(sink);
                }
            })
        }),
    });
    rows.push(Row {
        label: "(c) zstd decompress (zstd crate)",
        t: both(&|n| {
            measure(&g.items, &sizes, n, reps, idx, |mine| {
                for &i in mine.iter() {
                    zstd_decompress(&frames[i], &mut Counter::default()).unwrap();
                }
            })
        }),
    });
    rows.push(Row {
        label: "(d) tidemark decode",
        t: both(&|n| {
            measure(&g.items, &sizes, n, reps, idx, |mine| {
                for &i in mine.iter() {
                    tidemark_decode(ring, &names[i], &objects[i], &mut Counter::default());
                }
            })
        }),
    });

    // (e): each thread seals its own copy of its items in place, 1 MiB at a time (the same
    // buffers again on every repetition: throughput does not depend on the plaintext).
    let own = |mine: &[(usize, &Vec<u8>)]| -> Vec<Vec<u8>> {
        mine.iter().map(|(_, d)| d.to_vec()).collect()
    };
    let key_bytes = [0x5au8; 32];
    rows.push(Row {
        label: "(e) AES-256-GCM seal 1 MiB: aws-lc-rs",
        t: both(&|n| {
            let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).unwrap());
            measure(&g.items, &sizes, n, reps, own, |bufs| {
                let mut counter = 0u32;
                for b in bufs.iter_mut() {
                    for chunk in b.chunks_mut(AES_CHUNK) {
                        let mut nonce = [0u8; NONCE_LEN];
                        nonce[8..].copy_from_slice(&counter.to_be_bytes());
                        counter = counter.wrapping_add(1);
                        let tag = key
                            .seal_in_place_separate_tag(
                                Nonce::assume_unique_for_key(nonce),
                                Aad::empty(),
                                chunk,
                            )
                            .unwrap();
                        std::hint::black_box(tag);
                    }
                }
            })
        }),
    });
    rows.push(Row {
        label: "(e) AES-256-GCM seal 1 MiB: aes-gcm 0.11",
        t: both(&|n| {
            let cipher = aes_gcm::Aes256Gcm::new(&key_bytes.into());
            measure(&g.items, &sizes, n, reps, own, |bufs| {
                let mut counter = 0u32;
                for b in bufs.iter_mut() {
                    for chunk in b.chunks_mut(AES_CHUNK) {
                        let mut nonce = [0u8; 12];
                        nonce[8..].copy_from_slice(&counter.to_be_bytes());
                        counter = counter.wrapping_add(1);
                        let tag = cipher
                            .encrypt_inout_detached(&nonce.into(), b"", chunk.into())
                            .unwrap();
                        std::hint::black_box(tag);
                    }
                }
            })
        }),
    });
    rows
}

fn print_table(g: &Group, rows: &[Row]) {
    let mbps = |t: Timing| {
        format!(
            "{:>7.1} [{:>7.1}]",
            Timing::mbps(t.median, g.total),
            Timing::mbps(t.best, g.total)
        )
    };
    println!(
        "{:<42} {:>17} {:>17}",
        "MB/s of original bytes: median [best]", "1 thread", "2 threads"
    );
    for r in rows {
        println!("{:<42} {} {}", r.label, mbps(r.t[0]), mbps(r.t[1]));
        if r.label.starts_with("(b)") || r.label.starts_with("(d)") {
            let base = &rows[if r.label.starts_with("(b)") { 0 } else { 2 }];
            let over = |k: usize| {
                (r.t[k].median.as_secs_f64() / base.t[k].median.as_secs_f64() - 1.0) * 100.0
            };
            println!(
                "{:<42} {:>16.1}% {:>16.1}%",
                "    tidemark time overhead vs plain zstd",
                over(0),
                over(1)
            );
        }
    }
    let m = |i: usize, k: usize| Timing::mbps(rows[i].t[k].median, g.total);
    let over = |i: usize, b: usize, k: usize| {
        (rows[i].t[k].median.as_secs_f64() / rows[b].t[k].median.as_secs_f64() - 1.0) * 100.0
    };
    println!(
        "summary: {} bytes={} zstd_enc_1t={:.1} tm_enc_1t={:.1} enc_overhead_1t_pct={:.1} \
         zstd_enc_2t={:.1} tm_enc_2t={:.1} enc_overhead_2t_pct={:.1} zstd_dec_1t={:.1} \
         tm_dec_1t={:.1} dec_overhead_1t_pct={:.1} awslc_gcm_1t={:.1} aesgcm_1t={:.1}",
        g.key,
        g.total,
        m(0, 0),
        m(1, 0),
        over(1, 0, 0),
        m(0, 1),
        m(1, 1),
        over(1, 0, 1),
        m(2, 0),
        m(3, 0),
        over(3, 2, 0),
        m(4, 0),
        m(5, 0),
    );
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
    for (label, key, paths) in [
        ("relation files", "rel", &args.rel),
        ("WAL segments", "wal", &args.wal),
    ] {
        if paths.is_empty() {
            continue;
        }
        let g = load(label, key, paths, args.piece);
        let rows = bench_group(&g, &ring, args.reps);
        print_table(&g, &rows);
    }
    ExitCode::SUCCESS
}
