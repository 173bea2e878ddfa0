//! Alerts: conditions the daemon observes become notifications, deduplicated.
//!
//! Every condition has a key (cluster, event). Observations `set` it (firing, with the time of
//! the evidence) or `clear` it. `evaluate` decides what to send:
//! - a condition is notified once when it starts firing, again when its severity rises, and as
//!   a reminder after `repeat_interval`, then after twice that, ... (at most daily);
//! - when it clears, a "resolved" follows — only if its firing was notified;
//! - a condition that flaps (fires again within FLAP_WINDOW of resolving) waits before it is
//!   notified again, doubling each time, so an intermittent fault sends a few alerts an hour,
//!   not one per failure;
//! - while the repository is unreachable (`repository_unreachable`, one alert for the store
//!   all clusters share), conditions it causes (wal-push and backup failures on the store,
//!   failing repository checks, archive lag) are inhibited, and stay so for evidence older
//!   than the store's recovery plus a settle time: an S3 outage is one alert and one
//!   "resolved", not one per cluster and failure.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub const STORE_EVENT: &str = "repository_unreachable";
pub const STORE_CLUSTER: &str = "*";
const FLAP_WINDOW: Duration = Duration::from_secs(900);
const MAX_REPEAT: Duration = Duration::from_secs(86400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlertKey {
    pub cluster: String,
    pub event: &'static str,
}

/// One observation of a firing condition.
#[derive(Debug, Clone)]
pub struct Condition {
    pub key: AlertKey,
    pub severity: Severity,
    pub message: String,
    /// When the evidence was seen (a failure's time, a check's time).
    pub observed: DateTime<Utc>,
    /// Explained by an unreachable repository when one is firing.
    pub store_caused: bool,
    /// What the condition is about beyond its key (check_failed: the names of the failing
    /// checks). A name not in the last notification notifies again at once, as a new firing.
    pub topic: BTreeSet<String>,
}

/// What is sent to the webhook and the command.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Notification {
    pub cluster: String,
    /// Every cluster concerned (one, or all for a repository alert).
    pub clusters: Vec<String>,
    /// "warning", "critical", or "resolved".
    pub severity: String,
    /// "firing" or "resolved".
    pub status: String,
    pub event: String,
    pub message: String,
    pub time: DateTime<Utc>,
    /// Firing since.
    pub since: DateTime<Utc>,
    /// 0 for the first notification of a firing alert, then 1, 2, ... for reminders.
    pub repeat: u32,
    pub host: String,
    /// Slack-compatible one-line summary.
    pub text: String,
}

#[derive(Debug, Clone)]
struct Firing {
    cond: Condition,
    since: DateTime<Utc>,
    notified: Option<Severity>,
    /// The topic of the last notification.
    notified_topic: BTreeSet<String>,
    repeats: u32,
    next_repeat: Option<DateTime<Utc>>,
    /// Not before this time (flap damping).
    hold_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct Resolved {
    at: DateTime<Utc>,
    flaps: u32,
}

pub struct Alerter {
    firing: BTreeMap<AlertKey, Firing>,
    resolved: BTreeMap<AlertKey, Resolved>,
    repeat_interval: Duration,
    /// When the repository alert last resolved.
    store_recovered: Option<DateTime<Utc>>,
    /// When the repository last answered a probe.
    store_ok_at: Option<DateTime<Utc>>,
    store_settle: Duration,
    all_clusters: Vec<String>,
    host: String,
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1))
}

impl Alerter {
    pub fn new(
        repeat_interval: Duration,
        store_settle: Duration,
        clusters: Vec<String>,
    ) -> Alerter {
        Alerter {
            firing: BTreeMap::new(),
            resolved: BTreeMap::new(),
            repeat_interval,
            store_recovered: None,
            store_ok_at: None,
            store_settle,
            all_clusters: clusters,
            host: crate::host::hostname(),
        }
    }

    pub fn reconfigure(
        &mut self,
        repeat_interval: Duration,
        store_settle: Duration,
        clusters: Vec<String>,
    ) {
        self.repeat_interval = repeat_interval;
        self.store_settle = store_settle;
        self.all_clusters = clusters;
    }

    /// The condition is firing (again).
    pub fn set(&mut self, cond: Condition, now: DateTime<Utc>) {
        match self.firing.get_mut(&cond.key) {
            Some(f) => {
                // Evidence only moves forward (a stale observation must not reset it).
                let observed = cond.observed.max(f.cond.observed);
                f.cond = Condition { observed, ..cond };
            }
            None => {
                let hold_until = match self.resolved.get(&cond.key) {
                    Some(r)
                        if now - r.at
                            < chrono::Duration::from_std(FLAP_WINDOW).unwrap_or_default() =>
                    {
                        let wait = Duration::from_secs(60)
                            .saturating_mul(1 << r.flaps.min(10))
                            .min(self.repeat_interval);
                        Some(add(now, wait))
                    }
                    _ => None,
                };
                self.firing.insert(
                    cond.key.clone(),
                    Firing {
                        since: cond.observed.min(now),
                        cond,
                        notified: None,
                        notified_topic: BTreeSet::new(),
                        repeats: 0,
                        next_repeat: None,
                        hold_until,
                    },
                );
            }
        }
    }

    /// The condition no longer holds. Returns the "resolved" notification when its firing was
    /// notified.
    pub fn clear(&mut self, key: &AlertKey, now: DateTime<Utc>) -> Option<Notification> {
        let f = self.firing.remove(key)?;
        if key.event == STORE_EVENT {
            self.store_recovered = Some(now);
        }
        let flaps = match self.resolved.get(key) {
            Some(r)
                if now - r.at < chrono::Duration::from_std(FLAP_WINDOW * 2).unwrap_or_default() =>
            {
                r.flaps + 1
            }
            _ => 0,
        };
        f.notified?;
        self.resolved
            .insert(key.clone(), Resolved { at: now, flaps });
        Some(self.notification(&f, now, true))
    }

    /// The repository answered a probe at `at`.
    pub fn store_reachable(&mut self, at: DateTime<Utc>) {
        self.store_ok_at = Some(self.store_ok_at.map_or(at, |t| t.max(at)));
    }

    /// When the evidence of a firing condition was last seen.
    pub fn observed(&self, key: &AlertKey) -> Option<DateTime<Utc>> {
        self.firing.get(key).map(|f| f.cond.observed)
    }

    /// Ends (with a "resolved" where one is due) every condition of a cluster not in
    /// `clusters`, and every condition `keep` rejects: a removed cluster, or a job no longer
    /// scheduled, must not remind forever.
    pub fn retain(
        &mut self,
        now: DateTime<Utc>,
        keep: impl Fn(&AlertKey) -> bool,
    ) -> Vec<Notification> {
        let gone: Vec<AlertKey> = self
            .firing
            .keys()
            .filter(|k| k.cluster != STORE_CLUSTER && !keep(k))
            .cloned()
            .collect();
        gone.iter().filter_map(|k| self.clear(k, now)).collect()
    }

    pub fn firing_count(&self) -> usize {
        self.firing.len()
    }

    pub fn is_firing(&self, key: &AlertKey) -> bool {
        self.firing.contains_key(key)
    }

    fn inhibited(&self, f: &Firing) -> bool {
        if !f.cond.store_caused || f.cond.key.event == STORE_EVENT {
            return false;
        }
        if self.firing.contains_key(&AlertKey {
            cluster: STORE_CLUSTER.into(),
            event: STORE_EVENT,
        }) {
            return true;
        }
        // Not before a probe after the evidence showed the store reachable: until then the
        // store may be the cause, and its own alert the one to send.
        if self.store_ok_at.is_none_or(|t| t <= f.cond.observed) {
            return true;
        }
        // Evidence from before the store recovered (plus the time the archiver and the checks
        // need to retry) is explained by the outage.
        match self.store_recovered {
            Some(r) => f.cond.observed <= add(r, self.store_settle),
            None => false,
        }
    }

    /// Notifications due now.
    pub fn evaluate(&mut self, now: DateTime<Utc>) -> Vec<Notification> {
        let mut out = Vec::new();
        let keys: Vec<AlertKey> = self.firing.keys().cloned().collect();
        for key in keys {
            let Some(f) = self.firing.get(&key).cloned() else {
                continue;
            };
            if self.inhibited(&f) || f.hold_until.is_some_and(|h| now < h) {
                continue;
            }
            let widened = !f.cond.topic.is_subset(&f.notified_topic);
            let send = match f.notified {
                None => true,
                Some(s) if f.cond.severity > s || widened => true,
                Some(_) => f.next_repeat.is_some_and(|t| now >= t),
            };
            if !send {
                continue;
            }
            let repeat = match f.notified {
                Some(s) if f.cond.severity <= s && !widened => f.repeats + 1,
                _ => 0,
            };
            let wait = self
                .repeat_interval
                .saturating_mul(1 << repeat.min(10))
                .min(MAX_REPEAT);
            if let Some(e) = self.firing.get_mut(&key) {
                e.notified = Some(f.cond.severity.max(f.notified.unwrap_or(Severity::Warning)));
                e.repeats = repeat;
                e.next_repeat = Some(add(now, wait));
                e.notified_topic = f.cond.topic.clone();
            }
            let mut n = self.notification(&f, now, false);
            n.repeat = repeat;
            if repeat > 0 {
                n.text = format!("{} (still firing, reminder {repeat})", n.text);
            }
            out.push(n);
        }
        out
    }

    fn notification(&self, f: &Firing, now: DateTime<Utc>, resolved: bool) -> Notification {
        // Store errors carry long diagnostic chains: keep messages readable in a chat line.
        let message: String = shorten(&f.cond.message, 1000);
        let summary: String = shorten(&f.cond.message, 300);
        let clusters = if f.cond.key.cluster == STORE_CLUSTER {
            self.all_clusters.clone()
        } else {
            vec![f.cond.key.cluster.clone()]
        };
        let cluster = clusters.join(",");
        let severity = if resolved {
            "resolved".to_string()
        } else {
            f.cond.severity.as_str().to_string()
        };
        let text = if resolved {
            format!(
                "[tidemark] resolved: {} on cluster {} ({}), firing since {}",
                f.cond.key.event,
                cluster,
                summary,
                f.since.format("%Y-%m-%d %H:%M:%S+00")
            )
        } else {
            format!(
                "[tidemark] {}: {} on cluster {}: {}",
                f.cond.severity.as_str().to_uppercase(),
                f.cond.key.event,
                cluster,
                summary
            )
        };
        Notification {
            cluster,
            clusters,
            severity,
            status: if resolved { "resolved" } else { "firing" }.into(),
            event: f.cond.key.event.to_string(),
            message,
            time: now,
            since: f.since,
            repeat: 0,
            host: self.host.clone(),
            text,
        }
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max).collect();
    out.push('…');
    out
}

#[cfg(test)]
impl Notification {
    fn key(&self) -> AlertKey {
        let event: &'static str = Box::leak(self.event.clone().into_boxed_str());
        AlertKey {
            cluster: self.cluster.clone(),
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn cond(cluster: &str, event: &'static str, sev: Severity, at: i64, store: bool) -> Condition {
        Condition {
            key: AlertKey {
                cluster: cluster.into(),
                event,
            },
            severity: sev,
            message: format!("{event} at {at}"),
            observed: t(at),
            store_caused: store,
            topic: Default::default(),
        }
    }

    fn alerter() -> Alerter {
        Alerter::new(
            Duration::from_secs(3600),
            Duration::from_secs(60),
            vec!["acme".into(), "beta".into()],
        )
    }

    #[test]
    fn one_alert_then_reminders_with_backoff_then_resolved() {
        let mut a = alerter();
        let mut sent = Vec::new();
        // A failure observed every 10 s for 5 hours.
        for s in (0..5 * 3600).step_by(10) {
            a.set(
                cond("acme", "backup_failed", Severity::Critical, s, false),
                t(s),
            );
            sent.extend(a.evaluate(t(s)));
        }
        // First alert, reminder after 1 h, then after 2 h more (at 3 h); nothing else.
        let times: Vec<i64> = sent.iter().map(|n| (n.time - t(0)).num_seconds()).collect();
        assert_eq!(times, vec![0, 3600, 3 * 3600]);
        assert_eq!(sent[0].severity, "critical");
        assert_eq!(sent[0].status, "firing");
        assert_eq!(sent[0].cluster, "acme");
        assert_eq!(sent[1].repeat, 1);
        let r = a.clear(&sent[0].key(), t(5 * 3600)).unwrap();
        assert_eq!(r.severity, "resolved");
        assert_eq!(r.status, "resolved");
        assert!(r.text.contains("resolved"));
        assert!(a.evaluate(t(5 * 3600 + 10)).is_empty());
    }

    #[test]
    fn escalation_is_notified_and_unnotified_conditions_resolve_silently() {
        let mut a = alerter();
        a.set(
            cond("acme", "archive_lag", Severity::Warning, 0, false),
            t(0),
        );
        assert_eq!(a.evaluate(t(0)).len(), 1);
        a.set(
            cond("acme", "archive_lag", Severity::Warning, 5, false),
            t(5),
        );
        assert!(a.evaluate(t(5)).is_empty());
        a.set(
            cond("acme", "archive_lag", Severity::Critical, 10, false),
            t(10),
        );
        let n = a.evaluate(t(10));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].severity, "critical");
        // Inhibited the whole time: cleared without a word.
        a.set(
            cond(STORE_CLUSTER, STORE_EVENT, Severity::Critical, 20, false),
            t(20),
        );
        a.set(
            cond("beta", "archive_failing", Severity::Critical, 21, true),
            t(21),
        );
        let n = a.evaluate(t(21));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].event, STORE_EVENT);
        assert_eq!(n[0].cluster, "acme,beta");
        assert!(
            a.clear(
                &AlertKey {
                    cluster: "beta".into(),
                    event: "archive_failing"
                },
                t(30)
            )
            .is_none()
        );
    }

    #[test]
    fn a_newly_failing_check_notifies_again_a_recovering_one_does_not() {
        let mut a = alerter();
        let with = |at: i64, names: &[&str]| Condition {
            topic: names.iter().map(|n| n.to_string()).collect(),
            ..cond("acme", "check_failed", Severity::Warning, at, false)
        };
        a.set(with(0, &["pg_wal_space"]), t(0));
        assert_eq!(a.evaluate(t(0)).len(), 1);
        a.set(with(10, &["pg_wal_space"]), t(10));
        assert!(a.evaluate(t(10)).is_empty(), "same checks: deduplicated");
        // A second check fails: a new notification at once, not a reminder.
        a.set(with(20, &["pg_wal_space", "postgres"]), t(20));
        let n = a.evaluate(t(20));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].repeat, 0);
        // One of them recovers: nothing until the reminder is due.
        a.set(with(30, &["postgres"]), t(30));
        assert!(a.evaluate(t(30)).is_empty());
        assert!(a.evaluate(t(3600)).is_empty());
        assert_eq!(
            a.evaluate(t(3620)).len(),
            1,
            "the reminder after repeat_interval"
        );
    }
    #[test]
    fn store_outage_is_one_alert_and_one_resolved() {
        let mut a = alerter();
        let mut sent = Vec::new();
        // wal-push fails first (evidence at 5), the store probe confirms at 8.
        for s in 5..40 {
            a.set(
                cond(
                    "acme",
                    "archive_failing",
                    Severity::Critical,
                    5.max(s - 1),
                    true,
                ),
                t(s),
            );
            a.set(
                cond("beta", "backup_failed", Severity::Critical, 6, true),
                t(s),
            );
            if s >= 8 {
                a.set(
                    cond(STORE_CLUSTER, STORE_EVENT, Severity::Critical, s, false),
                    t(s),
                );
            }
            sent.extend(a.evaluate(t(s)));
        }
        // The store recovers at 40; archive_failing keeps its last evidence (39) until
        // PostgreSQL retries and succeeds at 70.
        sent.extend(a.clear(
            &AlertKey {
                cluster: STORE_CLUSTER.into(),
                event: STORE_EVENT,
            },
            t(40),
        ));
        a.store_reachable(t(40));
        for s in 41..70 {
            a.set(
                cond("acme", "archive_failing", Severity::Critical, 39, true),
                t(s),
            );
            a.store_reachable(t(s));
            sent.extend(a.evaluate(t(s)));
        }
        sent.extend(a.clear(
            &AlertKey {
                cluster: "acme".into(),
                event: "archive_failing",
            },
            t(70),
        ));
        let got: Vec<(String, String)> = sent
            .iter()
            .map(|n| (n.event.clone(), n.severity.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (STORE_EVENT.to_string(), "critical".to_string()),
                (STORE_EVENT.to_string(), "resolved".to_string())
            ]
        );
        // Fresh evidence after the settle time is a new problem, notified once a probe shows
        // the store is not the cause.
        a.set(
            cond("beta", "backup_failed", Severity::Critical, 200, true),
            t(200),
        );
        assert!(a.evaluate(t(200)).is_empty());
        a.store_reachable(t(201));
        assert_eq!(a.evaluate(t(201)).len(), 1);
    }

    #[test]
    fn flapping_is_damped() {
        let mut a = alerter();
        let mut sent = 0;
        let key = AlertKey {
            cluster: "acme".into(),
            event: "check_failed",
        };
        // Fails for 20 s, recovers for 40 s, for an hour.
        for minute in 0..60 {
            let s = minute * 60;
            for x in 0..20 {
                a.set(
                    cond("acme", "check_failed", Severity::Critical, s + x, false),
                    t(s + x),
                );
                sent += a.evaluate(t(s + x)).len();
            }
            sent += a.clear(&key, t(s + 20)).into_iter().count();
        }
        // Undamped this would be 120 notifications.
        assert!(sent <= 12, "{sent} notifications");
        assert!(sent >= 2);
    }
}
