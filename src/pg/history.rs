//! Timeline history files (`<TLI>.history`): each line `parent_tli <TAB> switch_lsn <TAB> reason`
//! lists an ancestor timeline and the LSN where its successor branched off.

use super::wal::Lsn;

/// One ancestor of a timeline: WAL of `timeline` is valid up to `end` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: u32,
    pub end: Lsn,
}

pub fn parse(text: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (parts.next(), parts.next()) else {
            return Err(format!("malformed history line {line:?}"));
        };
        let timeline = tli
            .parse::<u32>()
            .map_err(|_| format!("malformed timeline in history line {line:?}"))?;
        out.push(HistoryEntry {
            timeline,
            end: lsn.parse()?,
        });
    }
    Ok(out)
}

/// The timelines a recovery onto `target` passes through: (timeline, begins at, ends at).
/// `ancestors` is the parsed history of `target` (oldest first).
pub fn path_to(target: u32, ancestors: &[HistoryEntry]) -> Vec<(u32, Lsn, Option<Lsn>)> {
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    for a in ancestors {
        out.push((a.timeline, begin, Some(a.end)));
        begin = a.end;
    }
    out.push((target, begin, None));
    out
}

/// The timeline whose WAL file holds segment `segno` on the way to the path's last timeline:
/// the newest timeline that begins at or before the segment's end (PostgreSQL prefers the
/// newest timeline's copy of the segment that contains a switch point).
pub fn timeline_for_segment(
    path: &[(u32, Lsn, Option<Lsn>)],
    segno: u64,
    segment_size: u64,
) -> u32 {
    let seg_start = segno * segment_size;
    let seg_end = seg_start + segment_size;
    path.iter()
        .rev()
        .find(|(_, begin, _)| begin.0 < seg_end)
        .map(|(tli, _, _)| *tli)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        let h = parse("1\t0/5000000\tno recovery target specified\n\n2\t0/7000A00\tbefore 2026\n")
            .unwrap();
        assert_eq!(
            h[1],
            HistoryEntry {
                timeline: 2,
                end: Lsn(0x7000A00)
            }
        );
        let path = path_to(3, &h);
        let ss = 16 << 20;
        assert_eq!(timeline_for_segment(&path, 4, ss), 1);
        // The segment holding the switch point 0/5000000 starts exactly there: timeline 2's copy.
        assert_eq!(timeline_for_segment(&path, 5, ss), 2);
        assert_eq!(timeline_for_segment(&path, 6, ss), 2);
        // 0/7000A00 lies inside segment 7: timeline 3 has the copy with the switch.
        assert_eq!(timeline_for_segment(&path, 7, ss), 3);
        assert_eq!(timeline_for_segment(&path, 9, ss), 3);
        assert!(parse("garbage").is_err());
    }
}
