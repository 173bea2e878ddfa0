//! Progress of long transfers: a bar with bytes, rate and ETA on a terminal (indicatif), and a
//! structured log line every few seconds otherwise (daemons, CI, pipes).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Progress {
    done: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Progress {
    /// Starts reporting `what` towards `total` bytes.
    pub fn start(what: &'static str, total: u64) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let (d, s) = (done.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let started = Instant::now();
            if std::io::stderr().is_terminal() {
                let bar = indicatif::ProgressBar::new(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(what);
                loop {
                    bar.set_position(d.load(Ordering::Relaxed));
                    tokio::select! {
                        _ = s.notified() => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                bar.set_position(d.load(Ordering::Relaxed));
                bar.finish_and_clear();
            } else {
                loop {
                    tokio::select! {
                        _ = s.notified() => break,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    let n = d.load(Ordering::Relaxed);
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = n as f64 / secs;
                    let eta = if rate > 0.0 {
                        (total.saturating_sub(n)) as f64 / rate
                    } else {
                        0.0
                    };
                    tracing::info!(
                        what,
                        done_bytes = n,
                        total_bytes = total,
                        mb_per_s = format!("{:.1}", rate / 1e6),
                        eta_s = eta.round() as u64,
                        "progress"
                    );
                }
            }
        });
        Progress {
            done,
            stop,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    pub fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }

    pub async fn finish(&self) {
        self.stop.notify_one();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
