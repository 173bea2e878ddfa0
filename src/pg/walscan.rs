//! A streaming scan of one WAL segment for the facts the restorable window needs: the last
//! transaction commit/abort (its timestamp and LSN) and the start of the last record.
//!
//! Why: PostgreSQL stops a time-targeted recovery only at a commit or abort record later than
//! the target; with none in the archive it fails ("recovery ended before configured recovery
//! target was reached"). So the latest time a backup can be restored to is the timestamp of
//! the last commit/abort in the archived WAL, which only the WAL itself knows.
//!
//! Format facts used (stable from PostgreSQL 10 through 18, host byte order):
//! - pages of `xlp_xlog_blcksz` bytes, each starting with a header: 40 bytes (long) on the
//!   first page of a segment, 24 bytes (short) on the others; the long header carries the
//!   block size at offset 36; `xlp_info & XLP_FIRST_IS_CONTRECORD` with `xlp_rem_len` (offset
//!   16) says how many bytes at the start of the page continue a record from before;
//! - records start at 8-byte aligned positions and flow over page headers; `XLogRecord` is
//!   xl_tot_len u32, xl_xid u32, xl_prev u64, xl_info u8, xl_rmid u8, 2 pad, xl_crc u32;
//!   xl_tot_len 0 marks the end of WAL (after a switch record the rest is zeros);
//! - a record's headers follow: block references (id < 32), 253 origin (+2 bytes), 252
//!   top-level xid (+4), then 255 + u8 or 254 + u32 main data length; the main data is last;
//! - transaction records have rmid 1 (RM_XACT_ID); info & 0x70 is 0x00 commit, 0x20 abort,
//!   0x30 commit prepared, 0x40 abort prepared; their main data starts with xact_time, an
//!   int64 of microseconds since 2000-01-01 00:00:00 UTC.

use std::io::{self, Write};

use chrono::{DateTime, Utc};

use super::wal::Lsn;

const LONG_HEADER: u64 = 40;
const SHORT_HEADER: u64 = 24;
const RECORD_HEADER: usize = 24;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RM_XACT_ID: u8 = 1;
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalScan {
    /// The last commit or abort record: its timestamp and LSN.
    pub last_xact: Option<(DateTime<Utc>, Lsn)>,
    /// Where the last complete record header starts.
    pub last_record: Option<Lsn>,
    /// Restore points (pg_create_restore_point): name and LSN of the record.
    pub restore_points: Vec<(String, Lsn)>,
    /// The commit record of the transaction `WalScanner::find_xid` looks for.
    pub xid_commit: Option<Lsn>,
}

/// Enough for a restore point record's headers (2 bytes) and main data (8 + 64 bytes).
const COLLECT: usize = 80;
const RM_XLOG_ID: u8 = 0;
const XLOG_RESTORE_POINT: u8 = 0x70;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Xact,
    RestorePoint,
}

#[derive(Debug)]
enum State {
    /// Bytes of a record continued from the previous segment.
    Skip(u64),
    Align,
    Header {
        buf: [u8; RECORD_HEADER],
        got: usize,
        lsn: u64,
    },
    /// The first bytes after the header of a record whose main data matters.
    Collect {
        buf: [u8; COLLECT],
        got: usize,
        want: usize,
        tot_len: u64,
        kind: Kind,
    },
    Done,
}

/// Feed a segment's bytes in order (it is a `Write`), then call `finish`.
pub struct WalScanner {
    seg_start: u64,
    blcksz: u64,
    phys: u64,
    page_header: Vec<u8>,
    state: State,
    scan: WalScan,
    find_xid: Option<u32>,
    /// What the record being read contributes, applied only once all of it was read: the
    /// newest archived segment usually ends inside a record that continues in a segment
    /// PostgreSQL has not archived yet, and recovery cannot reach such a record.
    pending: Pending,
}

#[derive(Debug, Default)]
struct Pending {
    record: Option<u64>,
    xact: Option<DateTime<Utc>>,
    restore_point: Option<String>,
    xid_commit: bool,
}

impl WalScanner {
    pub fn new(seg_start: Lsn) -> WalScanner {
        WalScanner {
            seg_start: seg_start.0,
            blcksz: 8192,
            phys: 0,
            page_header: Vec::with_capacity(LONG_HEADER as usize),
            state: State::Align,
            scan: WalScan::default(),
            find_xid: None,
            pending: Pending::default(),
        }
    }

    /// Also look for the commit record of top-level transaction `xid`.
    pub fn find_xid(mut self, xid: u32) -> WalScanner {
        self.find_xid = Some(xid);
        self
    }

    pub fn finish(self) -> WalScan {
        self.scan
    }

    /// The current record was read whole: what it says counts.
    fn complete_record(&mut self) {
        let p = std::mem::take(&mut self.pending);
        if let Some(start) = p.record {
            self.scan.last_record = Some(Lsn(start));
            if let Some(t) = p.xact {
                self.scan.last_xact = Some((t, Lsn(start)));
            }
            if let Some(name) = p.restore_point {
                self.scan.restore_points.push((name, Lsn(start)));
            }
            if p.xid_commit {
                self.scan.xid_commit = Some(Lsn(start));
            }
        }
    }

    fn header_len(&self) -> u64 {
        if self.phys < self.blcksz {
            LONG_HEADER
        } else {
            SHORT_HEADER
        }
    }

    fn page_header_complete(&mut self) {
        let h = &self.page_header;
        let info = u16::from_ne_bytes([h[2], h[3]]);
        let rem_len = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]) as u64;
        if h.len() as u64 == LONG_HEADER {
            let b = u32::from_ne_bytes([h[36], h[37], h[38], h[39]]) as u64;
            if b.is_power_of_two() && (1024..=65536).contains(&b) {
                self.blcksz = b;
            }
            if info & XLP_FIRST_IS_CONTRECORD != 0 && matches!(self.state, State::Align) {
                self.state = State::Skip(rem_len);
            }
        }
        self.page_header.clear();
    }

    /// Consumes record bytes (page headers already removed); `lsn` is the LSN of data[0].
    fn record_bytes(&mut self, mut data: &[u8], mut lsn: u64) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Skip(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    lsn += take;
                    if *n == 0 {
                        self.state = State::Align;
                        self.complete_record();
                    }
                }
                State::Align => {
                    let pad = ((8 - lsn % 8) % 8).min(data.len() as u64);
                    data = &data[pad as usize..];
                    lsn += pad;
                    if lsn.is_multiple_of(8) {
                        self.state = State::Header {
                            buf: [0; RECORD_HEADER],
                            got: 0,
                            lsn,
                        };
                    }
                }
                State::Header {
                    buf,
                    got,
                    lsn: start,
                } => {
                    let take = (RECORD_HEADER - *got).min(data.len());
                    buf[*got..*got + take].copy_from_slice(&data[..take]);
                    *got += take;
                    data = &data[take..];
                    lsn += take as u64;
                    if *got < RECORD_HEADER {
                        continue;
                    }
                    let tot_len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
                    let (info, rmid, start) = (buf[16], buf[17], *start);
                    if tot_len < RECORD_HEADER as u64 {
                        self.state = State::Done; // end of WAL in this segment
                        continue;
                    }
                    self.pending = Pending {
                        record: Some(start),
                        ..Pending::default()
                    };
                    let rest = tot_len - RECORD_HEADER as u64;
                    let is_xact =
                        rmid == RM_XACT_ID && matches!(info & 0x70, 0x00 | 0x20 | 0x30 | 0x40);
                    let is_commit = rmid == RM_XACT_ID && matches!(info & 0x70, 0x00 | 0x30);
                    let xid = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    if is_commit && self.find_xid == Some(xid) {
                        self.pending.xid_commit = true;
                    }
                    let kind = if is_xact {
                        Some(Kind::Xact)
                    } else if rmid == RM_XLOG_ID && info & 0xF0 == XLOG_RESTORE_POINT {
                        Some(Kind::RestorePoint)
                    } else {
                        None
                    };
                    self.state = match kind {
                        Some(kind) if rest > 0 => State::Collect {
                            buf: [0; COLLECT],
                            got: 0,
                            want: rest.min(COLLECT as u64) as usize,
                            tot_len,
                            kind,
                        },
                        _ => State::Skip(rest),
                    };
                    if rest == 0 {
                        self.state = State::Align;
                        self.complete_record();
                    }
                }
                State::Collect {
                    buf,
                    got,
                    want,
                    tot_len,
                    kind,
                } => {
                    let take = (*want - *got).min(data.len());
                    buf[*got..*got + take].copy_from_slice(&data[..take]);
                    *got += take;
                    data = &data[take..];
                    lsn += take as u64;
                    if *got < *want {
                        continue;
                    }
                    match kind {
                        Kind::Xact => {
                            if let Some(t) = xact_time(&buf[..*want]) {
                                self.pending.xact = Some(t);
                            }
                        }
                        Kind::RestorePoint => {
                            if let Some(name) = restore_point_name(&buf[..*want]) {
                                self.pending.restore_point = Some(name);
                            }
                        }
                    }
                    let rest = *tot_len - RECORD_HEADER as u64 - *want as u64;
                    if rest > 0 {
                        self.state = State::Skip(rest);
                    } else {
                        self.state = State::Align;
                        self.complete_record();
                    }
                }
            }
        }
    }
}

/// Where the main data starts after a record's headers (records without block references).
fn main_data_start(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        match *b.get(i)? {
            253 => i += 3,
            252 => i += 5,
            255 => return Some(i + 2),
            254 => return Some(i + 5),
            _ => return None,
        }
    }
}

/// xl_restore_point: rp_time (8 bytes), then rp_name, NUL-terminated in 64 bytes.
fn restore_point_name(b: &[u8]) -> Option<String> {
    let start = main_data_start(b)? + 8;
    let raw = b.get(start..b.len().min(start + 64))?;
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8(raw[..end].to_vec()).ok()
}

/// The xact_time at the start of a transaction record's main data, when the record carries no
/// block references (commit and abort records never do).
fn xact_time(b: &[u8]) -> Option<DateTime<Utc>> {
    let mut i = 0;
    let main_start = loop {
        match *b.get(i)? {
            253 => i += 3,
            252 => i += 5,
            255 => break i + 2,
            254 => break i + 5,
            _ => return None,
        }
    };
    let ts = i64::from_ne_bytes(b.get(main_start..main_start + 8)?.try_into().ok()?);
    let us = ts.checked_add(PG_EPOCH_OFFSET_US)?;
    DateTime::from_timestamp_micros(us)
}

impl Write for WalScanner {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() && !matches!(self.state, State::Done) {
            let page_off = self.phys % self.blcksz;
            let hl = self.header_len();
            if page_off < hl {
                let take = ((hl - page_off) as usize).min(data.len());
                self.page_header.extend_from_slice(&data[..take]);
                data = &data[take..];
                self.phys += take as u64;
                if self.page_header.len() as u64 == hl {
                    self.page_header_complete();
                }
                continue;
            }
            let take = ((self.blcksz - page_off) as usize).min(data.len());
            let lsn = self.seg_start + self.phys;
            self.record_bytes(&data[..take], lsn);
            data = &data[take..];
            self.phys += take as u64;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
