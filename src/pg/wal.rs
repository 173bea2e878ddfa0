//! WAL file names and LSNs.
//!
//! A segment name is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split into
//! "log" (high) and "seg" (low) parts, where a log holds 2^32 bytes of WAL, i.e.
//! 2^32 / segment size segments. The split therefore depends on the segment size.

use std::fmt;
use std::str::FromStr;

/// A WAL location (log sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}: expected HI/LO in hex, e.g. 0/3000060"))?;
        let parse = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("invalid LSN {s:?}"));
            }
            u32::from_str_radix(p, 16).map_err(|_| format!("invalid LSN {s:?}"))
        };
        Ok(Lsn((u64::from(parse(hi)?) << 32) | u64::from(parse(lo)?)))
    }
}

/// Valid WAL segment sizes: powers of two from 1 MiB to 1 GiB.
pub fn valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&size)
}

/// The kinds of files PostgreSQL hands to archive_command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFileKind {
    /// A complete segment.
    Segment,
    /// The partial last segment of a timeline, written at promotion (`.partial`).
    Partial,
    /// A backup history file (`<segment>.<offset>.backup`).
    BackupHistory,
    /// A timeline history file (`<timeline>.history`).
    TimelineHistory,
}

/// A parsed WAL archive file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalFileName {
    pub name: String,
    pub kind: WalFileKind,
    pub timeline: u32,
    /// log/seg parts (zero for timeline history files).
    pub log: u32,
    pub seg: u32,
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()))
    .then(|| u32::from_str_radix(s, 16).ok())
    .flatten()
}

impl WalFileName {
    /// Parses a file name (no directory). Returns None for anything that is not a WAL archive
    /// file name.
    pub fn parse(name: &str) -> Option<WalFileName> {
        let seg_parts = |s: &str| -> Option<(u32, u32, u32)> {
            if s.len() != 24 {
                return None;
            }
            Some((hex8(&s[0..8])?, hex8(&s[8..16])?, hex8(&s[16..24])?))
        };
        let (kind, base) = if let Some(b) = name.strip_suffix(".partial") {
            (WalFileKind::Partial, b)
        } else if let Some(b) = name.strip_suffix(".backup") {
            // <segment>.<8 hex offset>.backup
            let (seg, off) = b.split_once('.')?;
            hex8(off)?;
            (WalFileKind::BackupHistory, seg)
        } else if let Some(b) = name.strip_suffix(".history") {
            let tli = hex8(b)?;
            return Some(WalFileName {
                name: name.to_string(),
                kind: WalFileKind::TimelineHistory,
                timeline: tli,
                log: 0,
                seg: 0,
            });
        } else {
            (WalFileKind::Segment, name)
        };
        let (timeline, log, seg) = seg_parts(base)?;
        if timeline == 0 {
            return None;
        }
        Some(WalFileName {
            name: name.to_string(),
            kind,
            timeline,
            log,
            seg,
        })
    }

    /// The segment number, given the segment size; None if the name is impossible for it.
    pub fn segment_no(&self, segment_size: u64) -> Option<u64> {
        let per_log = segments_per_log(segment_size);
        (u64::from(self.seg) < per_log).then(|| u64::from(self.log) * per_log + u64::from(self.seg))
    }
}

pub fn segments_per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

/// The name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per_log = segments_per_log(segment_size);
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// The segment holding `lsn`.
pub fn segment_of(lsn: Lsn, segment_size: u64) -> u64 {
    lsn.0 / segment_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let s = WalFileName::parse("000000010000000A000000FF").unwrap();
        assert_eq!(
            (s.kind, s.timeline, s.log, s.seg),
            (WalFileKind::Segment, 1, 10, 255)
        );
        assert_eq!(s.segment_no(16 << 20), Some(10 * 256 + 255));
        // With 64 MiB segments a log holds 64 segments: seg 0xFF is impossible.
        assert_eq!(s.segment_no(64 << 20), None);
        let p = WalFileName::parse("000000020000000000000003.partial").unwrap();
        assert_eq!((p.kind, p.timeline), (WalFileKind::Partial, 2));
        let b = WalFileName::parse("000000010000000000000002.00000028.backup").unwrap();
        assert_eq!((b.kind, b.seg), (WalFileKind::BackupHistory, 2));
        let h = WalFileName::parse("0000000A.history").unwrap();
        assert_eq!((h.kind, h.timeline), (WalFileKind::TimelineHistory, 10));
        for bad in [
            "",
            "postgresql.conf",
            "00000001000000000000000",
            "0000000100000000000000001",
            "000000010000000000000001.bak",
            "00000001000000000000000g",
            "000000010000000000000a01",
            "000000000000000000000001",
            "00000001.history.x",
            "000000010000000000000002.0000002.backup",
            "../000000010000000000000001",
        ] {
            assert!(WalFileName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn names_and_lsns() {
        assert_eq!(
            segment_name(1, 10 * 256 + 255, 16 << 20),
            "000000010000000A000000FF"
        );
        assert_eq!(segment_name(3, 65, 64 << 20), "000000030000000100000001");
        let l: Lsn = "0/3000060".parse().unwrap();
        assert_eq!(l.0, 0x3000060);
        assert_eq!(l.to_string(), "0/3000060");
        assert_eq!(
            "16/B374D848".parse::<Lsn>().unwrap().to_string(),
            "16/B374D848"
        );
        assert_eq!(segment_of(l, 16 << 20), 3);
        assert!("3000060".parse::<Lsn>().is_err());
        assert!("0/123456789".parse::<Lsn>().is_err());
        assert!(valid_segment_size(16 << 20) && !valid_segment_size(3 << 20));
    }
}
