//! The two on-disk structures tidemark reads directly.
//!
//! - `global/pg_control` starts with the database system identifier (uint64, host byte order),
//!   in every PostgreSQL version.
//! - Every WAL segment starts with an `XLogLongPageHeaderData` (host byte order):
//!   magic u16, info u16, timeline u32, pageaddr u64, rem_len u32, 4 padding bytes,
//!   then system identifier u64 (offset 24), segment size u32 (32), block size u32 (36).

use std::io::Read;
use std::path::Path;

use super::wal::Lsn;

/// `XLP_LONG_HEADER` in xlp_info.
const XLP_LONG_HEADER: u16 = 0x0002;
pub const LONG_PAGE_HEADER_LEN: usize = 40;

pub fn read_system_identifier(pgdata: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(pgdata.join("global/pg_control"))?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b)?;
    Ok(u64::from_ne_bytes(b))
}

/// The fields of a segment's first page header that tidemark checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub page_address: Lsn,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

/// Parses the long page header at the start of a WAL segment.
pub fn parse_segment_header(b: &[u8]) -> Result<SegmentHeader, String> {
    if b.len() < LONG_PAGE_HEADER_LEN {
        return Err(format!("{} bytes, too short for a WAL segment", b.len()));
    }
    let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_ne_bytes(a)
    };
    let magic = u16_at(0);
    // WAL page magics are 0xD0xx/0xD1xx (0xD10D in 14, 0xD110 in 15, ...).
    if magic & 0xFE00 != 0xD000 {
        return Err(format!("bad page magic {magic:#06x}, not a WAL segment"));
    }
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err("first page lacks the long header, not the start of a WAL segment".into());
    }
    Ok(SegmentHeader {
        magic,
        page_address: Lsn(u64_at(8)),
        system_identifier: u64_at(24),
        segment_size: u32_at(32),
        block_size: u32_at(36),
    })
}
