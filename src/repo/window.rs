//! The restorable window: from which moment to which moment the backups and the archived WAL
//! can restore the cluster, per timeline, taking WAL gaps into account.
//!
//! A backup restores to any point from its end (`stop_lsn`, at `stop_time`) up to the end of
//! the unbroken run of WAL segments that starts at its first segment, following the target
//! timeline's history. The end's time is the timestamp of the last commit or abort record in
//! that run (see `pg::walscan`): PostgreSQL can stop a time-targeted recovery only at such a
//! record, so no later time is restorable by time (replaying everything still is).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pg::history::{self, HistoryEntry};
use crate::pg::wal::{Lsn, WalFileKind, WalFileName, segment_name, segment_of};
use crate::repo::manifest::BackupManifest;

/// What the archive holds, indexed for window computations.
#[derive(Debug, Default)]
pub struct ArchiveIndex {
    pub segment_size: u64,
    /// timeline → segment number → when it was archived.
    pub segments: BTreeMap<u32, BTreeMap<u64, Option<DateTime<Utc>>>>,
    /// timeline → its parsed history (ancestors, oldest first).
    pub histories: HashMap<u32, Vec<HistoryEntry>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRange {
    pub backup: String,
    pub timeline: u32,
    pub from_time: DateTime<Utc>,
    pub from_lsn: String,
    /// None when the backup's own WAL is incomplete (not restorable).
    pub to_time: Option<DateTime<Utc>>,
    pub to_lsn: Option<String>,
    /// The first missing segment after the unbroken run, if later WAL exists beyond it.
    pub gap_at: Option<String>,
    pub restorable: bool,
    /// The last segments of the unbroken run (timeline, segment number), newest last: where
    /// the end time is looked up.
    #[serde(skip)]
    pub run_tail: Vec<(u32, u64)>,
}

/// How many segments back from the end of a run to look for the last commit.
pub const END_SCAN_SEGMENTS: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub timeline: u32,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl ArchiveIndex {
    pub fn new(segment_size: u64, files: &[(WalFileName, Option<DateTime<Utc>>)]) -> ArchiveIndex {
        let mut idx = ArchiveIndex {
            segment_size,
            ..Default::default()
        };
        for (f, modified) in files {
            if f.kind == WalFileKind::Segment
                && let Some(n) = f.segment_no(segment_size)
            {
                idx.segments
                    .entry(f.timeline)
                    .or_default()
                    .insert(n, *modified);
            }
        }
        idx
    }

    pub fn timelines(&self) -> BTreeSet<u32> {
        self.segments
            .keys()
            .copied()
            .chain(self.histories.keys().copied())
            .collect()
    }

    fn path(&self, target: u32) -> Vec<(u32, Lsn, Option<Lsn>)> {
        let empty = Vec::new();
        history::path_to(target, self.histories.get(&target).unwrap_or(&empty))
    }

    /// The timeline whose archived file holds segment `segno` on the way to `target`, if that
    /// file is archived.
    pub fn segment_timeline(&self, target: u32, segno: u64) -> Option<u32> {
        let tli = history::timeline_for_segment(&self.path(target), segno, self.segment_size);
        self.segments
            .get(&tli)
            .is_some_and(|m| m.contains_key(&segno))
            .then_some(tli)
    }

    /// Whether a recovery onto `target` can start from a backup taken on `timeline` that ends
    /// at `stop`: `timeline` is on target's path and was still current at `stop`.
    pub fn reachable(&self, timeline: u32, stop: Lsn, target: u32) -> bool {
        self.path(target)
            .iter()
            .any(|(t, _, end)| *t == timeline && end.is_none_or(|e| e >= stop))
    }

    /// The newest timeline a recovery from this backup can reach (recovery_target_timeline =
    /// latest).
    pub fn latest_timeline(&self, timeline: u32, stop: Lsn) -> u32 {
        self.timelines()
            .into_iter()
            .chain(std::iter::once(timeline))
            .filter(|t| self.reachable(timeline, stop, *t))
            .max()
            .unwrap_or(timeline)
    }

    /// What backup `b` can restore to on `target`.
    pub fn range(&self, b: &BackupManifest, target: u32) -> BackupRange {
        let ss = self.segment_size;
        let start: Lsn = b.start_lsn.parse().unwrap_or_default();
        let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
        let path = self.path(target);
        let has = |s: u64| {
            let tli = history::timeline_for_segment(&path, s, ss);
            self.segments
                .get(&tli)
                .and_then(|m| m.get(&s))
                .map(|t| (tli, *t))
        };
        let first = segment_of(start, ss);
        let needed_last = segment_of(Lsn(stop.0.saturating_sub(1).max(start.0)), ss);
        let mut s = first;
        let mut last = None;
        let mut run_tail = std::collections::VecDeque::new();
        while let Some(found) = has(s) {
            last = Some((s, found));
            run_tail.push_back((found.0, s));
            if run_tail.len() > END_SCAN_SEGMENTS {
                run_tail.pop_front();
            }
            s += 1;
        }
        let beyond = self
            .segments
            .values()
            .flat_map(|m| m.keys())
            .any(|&n| n > s);
        let restorable =
            self.reachable(b.timeline, stop, target) && last.is_some_and(|(n, _)| n >= needed_last);
        // Provisional ends (archive time, segment end); `resolve` replaces them with what the
        // WAL says.
        let (to_time, to_lsn) = match (restorable, last) {
            (true, Some((n, (_, t)))) => (t, Some(Lsn((n + 1) * ss).to_string())),
            _ => (None, None),
        };
        BackupRange {
            backup: b.id.clone(),
            timeline: target,
            from_time: b.stop_time,
            from_lsn: b.stop_lsn.clone(),
            to_time,
            to_lsn,
            gap_at: beyond.then(|| {
                let tli = history::timeline_for_segment(&path, s, ss);
                segment_name(tli, s, ss)
            }),
            restorable,
            run_tail: if restorable {
                run_tail.into()
            } else {
                Vec::new()
            },
        }
    }

    /// Every (backup, timeline) range worth reporting: each backup on each timeline it can reach.
    pub fn all_ranges(&self, backups: &[BackupManifest]) -> Vec<BackupRange> {
        let mut targets: BTreeSet<u32> = self.timelines();
        targets.extend(backups.iter().map(|b| b.timeline));
        let mut out = Vec::new();
        for t in targets {
            for b in backups {
                let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
                if self.reachable(b.timeline, stop, t) {
                    out.push(self.range(b, t));
                }
            }
        }
        out
    }
}

/// Restorable windows per timeline, merged over the (resolved) ranges.
pub fn windows(ranges: &[BackupRange]) -> Vec<Window> {
    type Span = (DateTime<Utc>, DateTime<Utc>);
    let mut by_tli: BTreeMap<u32, Vec<Span>> = BTreeMap::new();
    for r in ranges.iter().filter(|r| r.restorable) {
        if let Some(to) = r.to_time {
            by_tli
                .entry(r.timeline)
                .or_default()
                .push((r.from_time, to.max(r.from_time)));
        }
    }
    let mut out = Vec::new();
    for (t, mut rs) in by_tli {
        rs.sort();
        let mut merged: Vec<Span> = Vec::new();
        for (f, to) in rs {
            match merged.last_mut() {
                Some(last) if f <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((f, to)),
            }
        }
        out.extend(merged.into_iter().map(|(from, to)| Window {
            timeline: t,
            from,
            to,
        }));
    }
    out
}
