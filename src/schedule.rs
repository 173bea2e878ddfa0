//! Cron schedules for the tidemark daemon: 5-field cron expressions evaluated in an IANA
//! time zone with Vixie-cron semantics.
//!
//! Syntax: `minute hour day-of-month month day-of-week`, ranges 0-59, 0-23, 1-31, 1-12
//! (or `JAN`-`DEC`), 0-7 (0 and 7 are Sunday, or `SUN`-`SAT`); names are case-insensitive.
//! A field item is `*`, `n`, `a-b`, `*/s`, `a-b/s` or `a/s` (`a` to the field maximum);
//! items combine with commas. Macros: `@yearly`/`@annually`, `@monthly`, `@weekly`,
//! `@daily`/`@midnight`, `@hourly`; `@reboot` and seconds fields are rejected. As in Vixie
//! cron, when both day fields are restricted (neither starts with `*`) a day matches if
//! EITHER matches; otherwise both must.
//!
//! DST (Vixie cron): a job is *fixed-time* when neither its minute nor its hour field starts
//! with `*`; all other jobs are *wildcard* jobs.
//! - Gap (spring forward): a fixed-time run whose local time does not exist fires once at the
//!   first instant after the gap; several such runs in one gap collapse into that one firing.
//!   Wildcard jobs simply have no runs at non-existent local times.
//! - Overlap (fall back): a fixed-time run fires only at the first occurrence of its local
//!   time; a wildcard job fires at both occurrences.
//!
//! Assumption: a zone's UTC offset never changes by 3 hours or more at once (true of every
//! current zone; the largest modern DST shift is 2h), which bounds how far wall-clock and
//! instant order can disagree.

use std::fmt;

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

/// Bound on a local offset change; candidates further than this in wall-clock time from a
/// point cannot be on the other side of it in instant order.
const SLACK: TimeDelta = TimeDelta::hours(3);
/// Search horizon of [`Schedule::next_after`].
const HORIZON_YEARS: u32 = 50;

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    /// Names for `min`, `min + 1`, ...
    names: &'static [&'static str],
}

const FIELDS: [FieldSpec; 5] = [
    FieldSpec {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    FieldSpec {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    FieldSpec {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
    },
    FieldSpec {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ],
    },
    FieldSpec {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    },
];

/// Why a schedule was refused. The message quotes the expression (or the time zone) and names
/// the field and value, so a config error can be fixed from it alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "unknown time zone \"{name}\" (expected an IANA name such as \"Europe/Berlin\" or \"UTC\")"
    )]
    UnknownTimeZone { name: String },
    #[error("cron \"{expr}\": {problem}")]
    Cron { expr: String, problem: CronProblem },
}

/// What is wrong with a cron expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronProblem {
    #[error("@reboot is not supported")]
    Reboot,
    #[error("unknown macro @{name}")]
    UnknownMacro { name: String },
    #[error(
        "expected 5 fields (minute hour day-of-month month day-of-week), found {found}{}",
        if *.found == 6 { " (seconds fields are not supported)" } else { "" }
    )]
    FieldCount { found: usize },
    #[error("{field} has an empty list item in \"{text}\"")]
    EmptyItem { field: &'static str, text: String },
    #[error("{field} step 0 in \"{item}\" must be at least 1")]
    ZeroStep { field: &'static str, item: String },
    #[error("{field} step \"{step}\" is not a number")]
    StepNotANumber { field: &'static str, step: String },
    #[error("{field} range {range} is reversed")]
    ReversedRange { field: &'static str, range: String },
    #[error(
        "{field} value \"{value}\" is not {}",
        if *.names { "a number or name" } else { "a number" }
    )]
    NotANumber {
        field: &'static str,
        value: String,
        /// The field also takes names (months, days of the week).
        names: bool,
    },
    #[error("{field} {value} out of range {min}-{max}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: u32,
        max: u32,
    },
}

/// A parsed cron expression bound to a time zone. Each field is a bit set of allowed values.
#[derive(Clone)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    dom: u64,
    months: u64,
    /// Bits 0-6, Sunday = 0 (7 is folded into 0 at parse time).
    dow: u64,
    /// Either day field starts with `*`: days must match both fields rather than either.
    day_and: bool,
    /// Neither minute nor hour starts with `*` (see the module docs for why this matters).
    fixed_time: bool,
    tz: Tz,
    expr: String,
}

impl Schedule {
    /// Parses `expr` (5 fields or a macro) in time zone `tz` (IANA name such as
    /// "Europe/Berlin", or "UTC"). Errors quote the expression and name the field and value.
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let tz = parse_timezone(tz)?;
        let expr = expr.trim();
        let err = |problem: CronProblem| ScheduleError::Cron {
            expr: expr.to_string(),
            problem,
        };
        let body = match expr.strip_prefix('@') {
            None => expr,
            Some(name) => match name.to_ascii_lowercase().as_str() {
                "yearly" | "annually" => "0 0 1 1 *",
                "monthly" => "0 0 1 * *",
                "weekly" => "0 0 * * 0",
                "daily" | "midnight" => "0 0 * * *",
                "hourly" => "0 * * * *",
                "reboot" => return Err(err(CronProblem::Reboot)),
                _ => {
                    return Err(err(CronProblem::UnknownMacro {
                        name: name.to_string(),
                    }));
                }
            },
        };
        let fields: Vec<&str> = body.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(CronProblem::FieldCount {
                found: fields.len(),
            }));
        }
        let mut masks = [0u64; 5];
        for (mask, (text, spec)) in masks.iter_mut().zip(fields.iter().zip(&FIELDS)) {
            *mask = parse_field(text, spec).map_err(err)?;
        }
        let [minutes, hours, dom, months, mut dow] = masks;
        if dow & (1 << 7) != 0 {
            dow = (dow & !(1 << 7)) | 1;
        }
        let star = |i: usize| fields[i].starts_with('*');
        Ok(Schedule {
            minutes,
            hours,
            dom,
            months,
            dow,
            day_and: star(2) || star(4),
            fixed_time: !star(0) && !star(1),
            tz,
            expr: expr.to_string(),
        })
    }

    /// The first firing instant strictly after `after`; None only if none exists within 50
    /// years. Successive calls fed their own results yield strictly increasing instants.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Wall-clock order differs from instant order in an overlap, so scan wall-clock
        // candidates from SLACK before `after` and keep the minimal instant, stopping once
        // candidates are SLACK past the best local time (they cannot be earlier instants).
        let start = self.local(after) - SLACK;
        let last_day = start
            .date()
            .checked_add_months(Months::new(12 * HORIZON_YEARS));
        let mut best: Option<(DateTime<Utc>, NaiveDateTime)> = None;
        let mut day = start.date();
        while last_day.is_none_or(|last| day <= last) {
            if let Some((instant, cutoff)) = best
                && day > cutoff.date()
            {
                return Some(instant);
            }
            if self.day_matches(day) {
                for (hour, minute) in
                    bits(self.hours).flat_map(|h| bits(self.minutes).map(move |m| (h, m)))
                {
                    let t = day
                        .and_hms_opt(hour, minute, 0)
                        .expect("hour and minute bits are range-checked at parse time");
                    if t < start {
                        continue;
                    }
                    if let Some((instant, cutoff)) = best
                        && t > cutoff
                    {
                        return Some(instant);
                    }
                    for instant in self.instants(t).into_iter().flatten() {
                        if instant > after && best.is_none_or(|(b, _)| instant < b) {
                            best = Some((instant, self.local(instant) + SLACK));
                        }
                    }
                }
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        best.map(|(instant, _)| instant)
    }

    /// The expected interval between runs around `now`:
    /// `next_after(next_after(now)) - next_after(now)`; None if either run does not exist.
    pub fn period_at(&self, now: DateTime<Utc>) -> Option<std::time::Duration> {
        let first = self.next_after(now)?;
        let second = self.next_after(first)?;
        (second - first).to_std().ok()
    }

    /// The expression as given to [`Schedule::parse`] (trimmed; macros are not expanded).
    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The time zone the expression is evaluated in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    fn local(&self, instant: DateTime<Utc>) -> NaiveDateTime {
        instant.with_timezone(&self.tz).naive_local()
    }

    fn day_matches(&self, day: NaiveDate) -> bool {
        if !bit(self.months, day.month()) {
            return false;
        }
        let dom = bit(self.dom, day.day());
        let dow = bit(self.dow, day.weekday().num_days_from_sunday());
        if self.day_and { dom && dow } else { dom || dow }
    }

    /// The instants at which matching wall-clock time `t` fires, per the module's DST rules.
    fn instants(&self, t: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match self.tz.from_local_datetime(&t) {
            chrono::LocalResult::Single(d) => [Some(d.to_utc()), None],
            chrono::LocalResult::Ambiguous(a, b) => {
                let (a, b) = (a.to_utc().min(b.to_utc()), a.to_utc().max(b.to_utc()));
                [Some(a), (!self.fixed_time).then_some(b)]
            }
            chrono::LocalResult::None if self.fixed_time => [self.gap_end(t), None],
            chrono::LocalResult::None => [None, None],
        }
    }

    /// The first instant after the gap containing the non-existent wall-clock time `t`: the
    /// earliest instant whose local time exceeds `t`. Offsets stay within ±16h, so the
    /// search window `t ∓ 17h` (read as UTC) starts before and ends after the transition.
    fn gap_end(&self, t: NaiveDateTime) -> Option<DateTime<Utc>> {
        let local_at = |ts: i64| DateTime::from_timestamp(ts, 0).map(|u| self.local(u));
        let center = t.and_utc().timestamp();
        let (mut lo, mut hi) = (center - 17 * 3600, center + 17 * 3600);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if local_at(mid)? < t {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        DateTime::from_timestamp(hi, 0)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("expression", &self.expr)
            .field("timezone", &self.tz.name())
            .finish()
    }
}

/// Parses an IANA time zone name (e.g. "Europe/Berlin", "UTC"); the error names the value.
pub fn parse_timezone(s: &str) -> Result<Tz, ScheduleError> {
    s.trim()
        .parse::<Tz>()
        .map_err(|_| ScheduleError::UnknownTimeZone {
            name: s.to_string(),
        })
}

fn bit(mask: u64, value: u32) -> bool {
    (mask >> value) & 1 == 1
}

fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |&v| bit(mask, v))
}

/// Parses one field into a bit set of allowed values; errors name the field and value.
fn parse_field(text: &str, spec: &FieldSpec) -> Result<u64, CronProblem> {
    let field = spec.name;
    let mut mask = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(CronProblem::EmptyItem {
                field,
                text: text.to_string(),
            });
        }
        let (range, step) = match item.split_once('/') {
            None => (item, None),
            Some((range, step)) => match step.parse::<u32>() {
                Ok(0) => {
                    return Err(CronProblem::ZeroStep {
                        field,
                        item: item.to_string(),
                    });
                }
                Ok(step) => (range, Some(step)),
                Err(_) => {
                    return Err(CronProblem::StepNotANumber {
                        field,
                        step: step.to_string(),
                    });
                }
            },
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            (field_value(a, spec)?, field_value(b, spec)?)
        } else {
            let a = field_value(range, spec)?;
            (a, if step.is_some() { spec.max } else { a })
        };
        if lo > hi {
            return Err(CronProblem::ReversedRange {
                field,
                range: range.to_string(),
            });
        }
        let step = usize::try_from(step.unwrap_or(1)).unwrap_or(usize::MAX);
        for v in (lo..=hi).step_by(step) {
            mask |= 1 << v;
        }
    }
    Ok(mask)
}

fn field_value(s: &str, spec: &FieldSpec) -> Result<u32, CronProblem> {
    let field = spec.name;
    let (min, max) = (spec.min, spec.max);
    let value = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u32>().ok().filter(|v| (min..=max).contains(v))
    } else if let Some(i) = spec.names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        u32::try_from(i).ok().map(|i| min + i)
    } else {
        return Err(CronProblem::NotANumber {
            field,
            value: s.to_string(),
            names: !spec.names.is_empty(),
        });
    };
    value.ok_or_else(|| CronProblem::OutOfRange {
        field,
        value: s.to_string(),
        min,
        max,
    })
}

#[cfg(test)]
mod tests;
