//! Recovery targets and timelines: the types restore works with, and their parsing from the
//! text an operator types (the command line's --target-* and --tablespace-map). The messages
//! name the flags: they are what the operator sees.

use chrono::{DateTime, FixedOffset};
use serde::Serialize;

use crate::pg::wal::Lsn;

/// Where recovery should stop.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryTarget {
    Time(DateTime<FixedOffset>),
    Lsn(#[serde(serialize_with = "lsn_text")] Lsn),
    Xid(String),
    Name(String),
    /// The end of the backup (recovery_target = 'immediate').
    Immediate,
    /// Replay all archived WAL.
    Latest,
}

fn lsn_text<S: serde::Serializer>(l: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(l)
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(u32),
}

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget::Time(t) => format!("time {}", t.format("%Y-%m-%d %H:%M:%S%.f%:z")),
            RecoveryTarget::Lsn(l) => format!("lsn {l}"),
            RecoveryTarget::Xid(x) => format!("xid {x}"),
            RecoveryTarget::Name(n) => format!("restore point {n:?}"),
            RecoveryTarget::Immediate => "end of the backup (immediate)".into(),
            RecoveryTarget::Latest => "end of the archived WAL".into(),
        }
    }
}

/// Parses a recovery target time. A time zone is required: PostgreSQL would otherwise read it
/// in the restored server's zone, which the operator may not know during an incident.
pub fn parse_target_time(s: &str) -> Result<DateTime<FixedOffset>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S %#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t);
        }
    }
    Err(format!(
        "invalid --target-time {s:?}: use 'YYYY-MM-DD HH:MM:SS[.ffffff]+TZ', e.g. '2026-11-27 09:41:07+00'"
    ))
}

/// The recovery target flags as given: at most one is set (the command line makes them
/// exclusive; should several be set, the first in this order wins). None: replay all WAL.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetSpec<'a> {
    pub time: Option<&'a str>,
    pub lsn: Option<&'a str>,
    pub xid: Option<&'a str>,
    pub name: Option<&'a str>,
    pub immediate: bool,
}

/// Where recovery should stop, from its textual form.
pub fn parse_target(spec: &TargetSpec<'_>) -> Result<RecoveryTarget, String> {
    if let Some(t) = spec.time {
        return parse_target_time(t).map(RecoveryTarget::Time);
    }
    if let Some(l) = spec.lsn {
        return l.parse().map(RecoveryTarget::Lsn);
    }
    if let Some(x) = spec.xid {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "--target-xid {x:?}: expected a transaction id (digits)"
            ));
        }
        return Ok(RecoveryTarget::Xid(x.to_string()));
    }
    if let Some(n) = spec.name {
        return Ok(RecoveryTarget::Name(n.to_string()));
    }
    Ok(if spec.immediate {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::Latest
    })
}

/// `latest`, `current` (the backup's timeline) or a timeline number.
pub fn parse_target_timeline(s: &str) -> Result<TargetTimeline, String> {
    match s {
        "latest" => Ok(TargetTimeline::Latest),
        "current" => Ok(TargetTimeline::Current),
        n => n
            .parse()
            .map(TargetTimeline::Id)
            .map_err(|_| format!("--target-timeline {n:?}: expected latest, current or a number")),
    }
}

/// `OLD=NEW` pairs: the tablespace at OLD is restored into NEW.
pub fn parse_tablespace_map(pairs: &[String]) -> Result<Vec<(String, String)>, String> {
    pairs
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(old, new)| (old.to_string(), new.to_string()))
                .ok_or_else(|| format!("--tablespace-map {m:?}: expected OLD=NEW"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_time_needs_a_zone() {
        assert!(parse_target_time("2026-11-27 09:41:07+00").is_ok());
        assert!(parse_target_time("2026-11-27 09:41:07.123456+02:00").is_ok());
        assert!(parse_target_time("2026-11-27T09:41:07Z").is_ok());
        assert!(parse_target_time("2026-11-27 09:41:07").is_err());
    }

    // A restore plan prints its target: LSNs as PostgreSQL writes them.
    #[test]
    fn targets_serialize_readably() {
        let lsn = RecoveryTarget::Lsn("0/3000060".parse().unwrap());
        assert_eq!(
            serde_json::to_value(&lsn).unwrap(),
            serde_json::json!({"lsn": "0/3000060"})
        );
        assert_eq!(
            serde_json::to_value(RecoveryTarget::Latest).unwrap(),
            serde_json::json!("latest")
        );
    }

    #[test]
    fn targets_parse_from_their_flags() {
        let none = TargetSpec::default();
        assert_eq!(parse_target(&none), Ok(RecoveryTarget::Latest));
        let immediate = TargetSpec {
            immediate: true,
            ..none
        };
        assert_eq!(parse_target(&immediate), Ok(RecoveryTarget::Immediate));
        let lsn = TargetSpec {
            lsn: Some("0/3000060"),
            ..none
        };
        assert_eq!(
            parse_target(&lsn),
            Ok(RecoveryTarget::Lsn("0/3000060".parse().unwrap()))
        );
        let xid = |x| TargetSpec {
            xid: Some(x),
            ..none
        };
        assert_eq!(
            parse_target(&xid("42")),
            Ok(RecoveryTarget::Xid("42".into()))
        );
        assert_eq!(
            parse_target(&xid("4x")),
            Err("--target-xid \"4x\": expected a transaction id (digits)".into())
        );
        assert!(parse_target(&xid("")).is_err());
        let time = TargetSpec {
            time: Some("2026-11-27 09:41:07"),
            ..none
        };
        assert!(parse_target(&time).unwrap_err().contains("--target-time"));
    }

    #[test]
    fn timelines_and_tablespace_maps() {
        assert_eq!(parse_target_timeline("latest"), Ok(TargetTimeline::Latest));
        assert_eq!(
            parse_target_timeline("current"),
            Ok(TargetTimeline::Current)
        );
        assert_eq!(parse_target_timeline("3"), Ok(TargetTimeline::Id(3)));
        assert_eq!(
            parse_target_timeline("x"),
            Err("--target-timeline \"x\": expected latest, current or a number".into())
        );
        assert_eq!(
            parse_tablespace_map(&["/a=/b=c".into()]),
            Ok(vec![("/a".into(), "/b=c".into())])
        );
        assert_eq!(
            parse_tablespace_map(&["/a".into()]),
            Err("--tablespace-map \"/a\": expected OLD=NEW".into())
        );
    }
}
