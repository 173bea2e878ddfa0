use super::*;
use chrono::Timelike;

fn at(s: &str) -> DateTime<Utc> {
    NaiveDateTime::parse_from_str(s, "%FT%RZ")
        .unwrap()
        .and_utc()
}

/// The first `n` firings after `from`, formatted like `at` parses.
fn runs(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
    let s = Schedule::parse(expr, tz).unwrap();
    let next = |t: &DateTime<Utc>| s.next_after(*t);
    let all = std::iter::successors(next(&at(from)), next).take(n);
    all.map(|t| t.format("%FT%RZ").to_string()).collect()
}

/// zone | expression | after | the exact next firings (UTC). Berlin 2026: spring forward
/// 03-29 02:00 CET -> 03:00 CEST, fall back 10-25 03:00 CEST -> 02:00 CET. New York 2026:
/// 03-08 02:00 EST -> 03:00 EDT, 11-01 02:00 EDT -> 01:00 EST.
const CASES: &str = "
    UTC              | 0 2 * * *      | 2026-01-10T00:00Z | 2026-01-10T02:00Z 2026-01-11T02:00Z
    UTC              | 0 2 * * *      | 2026-01-10T02:00Z | 2026-01-11T02:00Z
    Europe/Berlin    | 0 2 * * *      | 2026-01-10T00:00Z | 2026-01-10T01:00Z 2026-01-11T01:00Z
    Europe/Berlin    | 0 2 * * *      | 2026-07-09T23:00Z | 2026-07-10T00:00Z 2026-07-11T00:00Z
    UTC              | */15 * * * *   | 2026-01-10T10:07Z | 2026-01-10T10:15Z 2026-01-10T10:30Z 2026-01-10T10:45Z 2026-01-10T11:00Z
    UTC              | 0 1-10/3 * * * | 2026-01-10T00:00Z | 2026-01-10T01:00Z 2026-01-10T04:00Z 2026-01-10T07:00Z 2026-01-10T10:00Z 2026-01-11T01:00Z
    UTC              | 50/5 23 * * *  | 2026-01-10T00:00Z | 2026-01-10T23:50Z 2026-01-10T23:55Z 2026-01-11T23:50Z
    UTC              | 0 9 * * 1-5    | 2026-01-09T09:00Z | 2026-01-12T09:00Z 2026-01-13T09:00Z
    UTC              | 0 0 1 * *      | 2026-01-15T00:00Z | 2026-02-01T00:00Z 2026-03-01T00:00Z
    UTC              | 0 4 * * SUN    | 2026-03-01T12:00Z | 2026-03-08T04:00Z 2026-03-15T04:00Z
    UTC              | 0 0 1 JAN *    | 2026-03-01T12:00Z | 2027-01-01T00:00Z 2028-01-01T00:00Z
    UTC              | @weekly        | 2026-03-01T12:00Z | 2026-03-08T00:00Z
    UTC              | @hourly        | 2026-03-01T12:00Z | 2026-03-01T13:00Z
    UTC              | 0 0 13 * 5     | 2026-04-01T00:00Z | 2026-04-03T00:00Z 2026-04-10T00:00Z 2026-04-13T00:00Z 2026-04-17T00:00Z
    UTC              | 0 0 */2 * 5    | 2026-04-01T00:00Z | 2026-04-03T00:00Z 2026-04-17T00:00Z
    UTC              | 0 0 29 2 1     | 2026-03-01T00:00Z | 2027-02-01T00:00Z 2027-02-08T00:00Z
    UTC              | 0 0 29 2 *     | 2026-01-01T00:00Z | 2028-02-29T00:00Z 2032-02-29T00:00Z
    Europe/Berlin    | 30 2 * * *     | 2026-03-28T00:00Z | 2026-03-28T01:30Z 2026-03-29T01:00Z 2026-03-30T00:30Z
    Europe/Berlin    | 15,45 2 * * *  | 2026-03-28T12:00Z | 2026-03-29T01:00Z 2026-03-30T00:15Z
    Europe/Berlin    | */30 * * * *   | 2026-03-29T00:15Z | 2026-03-29T00:30Z 2026-03-29T01:00Z 2026-03-29T01:30Z
    Europe/Berlin    | 30 2 * * *     | 2026-10-24T12:00Z | 2026-10-25T00:30Z 2026-10-26T01:30Z
    Europe/Berlin    | */30 * * * *   | 2026-10-24T23:45Z | 2026-10-25T00:00Z 2026-10-25T00:30Z 2026-10-25T01:00Z 2026-10-25T01:30Z 2026-10-25T02:00Z
    America/New_York | 30 2 * * *     | 2026-03-07T12:00Z | 2026-03-08T07:00Z 2026-03-09T06:30Z
    America/New_York | 30 1 * * *     | 2026-10-31T12:00Z | 2026-11-01T05:30Z 2026-11-02T06:30Z
    America/New_York | 0 * * * *      | 2026-11-01T04:30Z | 2026-11-01T05:00Z 2026-11-01T06:00Z 2026-11-01T07:00Z
";

#[test]
fn exact_firings() {
    for line in CASES.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let want: Vec<&str> = cols[3].split(' ').collect();
        let got = runs(cols[1], cols[0], cols[2], want.len());
        assert_eq!(got, want, "{line}");
    }
}

#[test]
fn macros_names_and_accessors() {
    let from = "2026-03-01T12:00Z";
    for (a, b) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@HOURLY", "0 * * * *"),
        ("0 4 * * SUN", "0 4 * * 0"),
        ("0 4 * * 7", "0 4 * * 0"),
        ("0 0 1 jan *", "0 0 1 1 *"),
        ("0 9 * * mon-FRI", "0 9 * * 1-5"),
    ] {
        assert_eq!(
            runs(a, "UTC", from, 3),
            runs(b, "UTC", from, 3),
            "{a} vs {b}"
        );
    }
    let s = Schedule::parse(" @daily ", "Europe/Berlin").unwrap();
    assert_eq!(s.expression(), "@daily");
    assert_eq!(s.timezone(), chrono_tz::Europe::Berlin);
    let debug = format!("{:?}", s.clone());
    assert_eq!(
        debug,
        r#"Schedule { expression: "@daily", timezone: "Europe/Berlin" }"#
    );
    // Never fires (no Feb 30): gives up at the horizon instead of looping.
    let never = Schedule::parse("0 0 30 2 *", "Europe/Berlin").unwrap();
    assert_eq!(never.next_after(at("2026-01-01T00:00Z")), None);
    assert_eq!(never.period_at(at("2026-01-01T00:00Z")), None);
}

#[test]
fn period() {
    let period = |expr, now| {
        Schedule::parse(expr, "Europe/Berlin")
            .unwrap()
            .period_at(at(now))
    };
    let secs = std::time::Duration::from_secs;
    assert_eq!(period("0 2 * * *", "2026-01-10T12:00Z"), Some(secs(86_400)));
    assert_eq!(period("* * * * *", "2026-01-10T12:00Z"), Some(secs(60)));
    assert_eq!(
        period("0 4 * * 0", "2026-01-10T12:00Z"),
        Some(secs(7 * 86_400))
    );
    // Across spring forward the local day is 23 hours long.
    assert_eq!(
        period("0 4 * * *", "2026-03-28T00:00Z"),
        Some(secs(23 * 3600))
    );
}

#[test]
fn parse_errors_name_field_and_value() {
    let err = |expr| Schedule::parse(expr, "UTC").unwrap_err().to_string();
    assert_eq!(
        err("0 25 * * *"),
        r#"cron "0 25 * * *": hour 25 out of range 0-23"#
    );
    for (expr, want) in [
        ("60 * * * *", "minute 60 out of range 0-59"),
        ("* * 0 * *", "day-of-month 0 out of range 1-31"),
        ("* * * 13 *", "month 13 out of range 1-12"),
        ("* * * * 8", "day-of-week 8 out of range 0-7"),
        ("5-2 * * * *", "minute range 5-2 is reversed"),
        ("* * * * SAT-SUN", "day-of-week range SAT-SUN is reversed"),
        ("*/0 * * * *", "minute step 0"),
        ("* */x * * *", r#"hour step "x" is not a number"#),
        ("1,,2 * * * *", "minute has an empty list item"),
        (
            "* * * FOO *",
            r#"month value "FOO" is not a number or name"#,
        ),
        ("* -1 * * *", r#"hour value "" is not a number"#),
        ("@reboot", "@reboot is not supported"),
        ("@fortnightly", "unknown macro @fortnightly"),
        ("0 0 * * * *", "found 6 (seconds fields are not supported)"),
        ("0 0 * *", "expected 5 fields"),
        ("", "found 0"),
    ] {
        let e = err(expr);
        assert!(
            e.starts_with(&format!("cron \"{expr}\": ")) && e.contains(want),
            "{e}"
        );
    }
    let e = Schedule::parse("0 2 * * *", "Mars/Olympus")
        .unwrap_err()
        .to_string();
    assert!(e.contains(r#"unknown time zone "Mars/Olympus""#), "{e}");
    assert_eq!(parse_timezone("UTC").unwrap(), chrono_tz::UTC);
    assert!(parse_timezone("").is_err());
    // The kind is a value, not only words.
    assert_eq!(
        Schedule::parse("0 25 * * *", "UTC").unwrap_err(),
        ScheduleError::Cron {
            expr: "0 25 * * *".into(),
            problem: CronProblem::OutOfRange {
                field: "hour",
                value: "25".into(),
                min: 0,
                max: 23
            },
        }
    );
    assert_eq!(
        parse_timezone("Mars/Olympus").unwrap_err(),
        ScheduleError::UnknownTimeZone {
            name: "Mars/Olympus".into()
        }
    );
}

fn matches(s: &Schedule, t: NaiveDateTime) -> bool {
    t.second() == 0
        && s.day_matches(t.date())
        && bit(s.hours, t.hour())
        && bit(s.minutes, t.minute())
}

const EXPRS: [&str; 8] = [
    "*/15 * * * *",
    "30 2 * * *",
    "0 * * * *",
    "15,45 1-3 * * *",
    "0,30 2 * * *",
    "* 2 * * *",
    "45 1 * * 0",
    "0 9 * * 1-5",
];
const ZONES: [&str; 4] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
];
/// Shortly before the 2026 transitions of the zones above (Lord Howe: 04-05, 10-04).
const STARTS: [&str; 6] = ["03-07", "03-28", "04-04", "10-03", "10-24", "10-31"];

#[test]
fn property_increasing_and_matching() {
    for (expr, zone, start) in EXPRS
        .iter()
        .flat_map(|e| ZONES.iter().flat_map(move |z| STARTS.map(|s| (e, z, s))))
    {
        let s = Schedule::parse(expr, zone).unwrap();
        let mut prev = at(&format!("2026-{start}T00:00Z"));
        for _ in 0..500 {
            let next = s.next_after(prev).unwrap();
            assert!(next > prev, "{expr} {zone}: {next} after {prev}");
            let local = s.local(next);
            if !matches(&s, local) {
                // Only a gap-shifted fixed-time run, exactly on a spring-forward transition.
                let before = s.local(next - TimeDelta::seconds(1));
                let shifted = s.fixed_time && local - before > TimeDelta::seconds(1);
                assert!(
                    shifted && s.day_matches(local.date()),
                    "{expr} {zone}: {next} ({local}) does not match"
                );
            }
            prev = next;
        }
    }
}

/// Independent model: walk real minutes, deciding for each whether the job fires.
fn oracle(s: &Schedule, from: DateTime<Utc>, minutes: i64) -> Vec<DateTime<Utc>> {
    let fires = |u: DateTime<Utc>| {
        let local = s.local(u);
        let first =
            s.tz.from_local_datetime(&local)
                .earliest()
                .map(|d| d.to_utc())
                == Some(u);
        let skipped = (1..)
            .map(|k| s.local(u - TimeDelta::minutes(1)) + TimeDelta::minutes(k))
            .take_while(|t| *t < local)
            .any(|t| matches(s, t));
        (matches(s, local) && (first || !s.fixed_time)) || (s.fixed_time && skipped)
    };
    (1..=minutes)
        .map(|k| from + TimeDelta::minutes(k))
        .filter(|u| fires(*u))
        .collect()
}

#[test]
fn property_agrees_with_minute_by_minute_oracle() {
    for (expr, zone) in EXPRS
        .iter()
        .flat_map(|e| ZONES[1..].iter().map(move |z| (e, z)))
    {
        let s = Schedule::parse(expr, zone).unwrap();
        for start in STARTS {
            let (from, minutes) = (at(&format!("2026-{start}T00:00Z")), 3 * 1440);
            let want = oracle(&s, from, minutes);
            let end = from + TimeDelta::minutes(minutes);
            let got: Vec<_> = std::iter::successors(s.next_after(from), |t| s.next_after(*t))
                .take_while(|t| *t <= end)
                .collect();
            assert_eq!(got, want, "{expr} {zone} from {start}");
        }
    }
}
