//! What the WAL archive holds, per timeline: first and last segment and every gap.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pg::wal::{WalFileKind, WalFileName, segment_name};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalGap {
    /// First missing segment.
    pub from: String,
    /// Last missing segment.
    pub to: String,
    pub missing: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineSummary {
    pub timeline: u32,
    pub first: Option<String>,
    pub last: Option<String>,
    pub segments: u64,
    pub gaps: Vec<WalGap>,
    pub partial: Vec<String>,
    pub history_file: bool,
    pub backup_history_files: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WalSummary {
    pub wal_segment_size: u64,
    pub timelines: Vec<TimelineSummary>,
    /// Objects under wal/ whose names are not WAL file names.
    pub unrecognised: Vec<String>,
}

/// Gaps that end at or after segment `from` (the oldest backup's first segment): WAL missing
/// there breaks the restorable history. With no backup (`None`) every gap counts.
pub fn gaps_from(summary: &WalSummary, from: Option<u64>) -> Vec<(u32, WalGap)> {
    let ss = summary.wal_segment_size;
    summary
        .timelines
        .iter()
        .flat_map(|t| t.gaps.iter().map(move |g| (t.timeline, g.clone())))
        .filter(|(_, g)| {
            let to = WalFileName::parse(&g.to).and_then(|f| f.segment_no(ss));
            match (from, to) {
                (Some(start), Some(to)) => to >= start,
                _ => true,
            }
        })
        .collect()
}

/// Summarises archived WAL files. Segment numbers come from names, so the segment size must be
/// the cluster's.
pub fn summarise(files: &[WalFileName], strays: Vec<String>, segment_size: u64) -> WalSummary {
    let mut by_tli: BTreeMap<u32, TimelineSummary> = BTreeMap::new();
    let mut segnos: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut unrecognised = strays;
    for f in files {
        let t = by_tli.entry(f.timeline).or_insert_with(|| TimelineSummary {
            timeline: f.timeline,
            first: None,
            last: None,
            segments: 0,
            gaps: Vec::new(),
            partial: Vec::new(),
            history_file: false,
            backup_history_files: Vec::new(),
        });
        match f.kind {
            WalFileKind::Segment => match f.segment_no(segment_size) {
                Some(n) => segnos.entry(f.timeline).or_default().push(n),
                None => unrecognised.push(f.name.clone()),
            },
            WalFileKind::Partial => t.partial.push(f.name.clone()),
            WalFileKind::TimelineHistory => t.history_file = true,
            WalFileKind::BackupHistory => t.backup_history_files.push(f.name.clone()),
        }
    }
    for (tli, mut nos) in segnos {
        nos.sort_unstable();
        nos.dedup();
        let Some(t) = by_tli.get_mut(&tli) else {
            continue;
        };
        t.segments = nos.len() as u64;
        t.first = nos.first().map(|&n| segment_name(tli, n, segment_size));
        t.last = nos.last().map(|&n| segment_name(tli, n, segment_size));
        for w in nos.windows(2) {
            if w[1] > w[0] + 1 {
                t.gaps.push(WalGap {
                    from: segment_name(tli, w[0] + 1, segment_size),
                    to: segment_name(tli, w[1] - 1, segment_size),
                    missing: w[1] - w[0] - 1,
                });
            }
        }
    }
    WalSummary {
        wal_segment_size: segment_size,
        timelines: by_tli.into_values().collect(),
        unrecognised,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_gaps_per_timeline() {
        let names = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000005",
            "0000000100000001000000FF",
            "000000010000000000000002.00000028.backup",
            "00000002.history",
            "000000020000000000000005",
            "000000010000000000000006.partial",
        ];
        let files: Vec<_> = names
            .iter()
            .map(|n| WalFileName::parse(n).unwrap())
            .collect();
        let s = summarise(&files, vec![], 16 << 20);
        assert_eq!(s.timelines.len(), 2);
        let t1 = &s.timelines[0];
        assert_eq!(t1.first.as_deref(), Some("000000010000000000000001"));
        assert_eq!(t1.last.as_deref(), Some("0000000100000001000000FF"));
        assert_eq!(t1.segments, 4);
        assert_eq!(
            t1.gaps,
            vec![
                WalGap {
                    from: "000000010000000000000003".into(),
                    to: "000000010000000000000004".into(),
                    missing: 2
                },
                WalGap {
                    from: "000000010000000000000006".into(),
                    to: "0000000100000001000000FE".into(),
                    missing: 256 + 0xFE - 6 + 1
                },
            ]
        );
        assert_eq!(t1.partial, ["000000010000000000000006.partial"]);
        assert_eq!(t1.backup_history_files.len(), 1);
        assert!(s.timelines[1].history_file);
        assert_eq!(s.timelines[1].segments, 1);
    }
}
