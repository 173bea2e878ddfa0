//! Bounded concurrency for transfers.

use std::future::Future;

use tokio::task::JoinSet;

use crate::error::Error;

/// Runs `jobs` with at most `parallelism` at once, pulling the next job only when a slot is
/// free (so jobs are built lazily and memory stays bounded). The first error stops everything:
/// jobs not yet started never start, running ones are aborted (dropping the JoinSet aborts
/// them), and the error is returned. Results come in completion order.
pub async fn run_bounded<T, Fut>(
    jobs: impl IntoIterator<Item = Fut>,
    parallelism: usize,
) -> Result<Vec<T>, Error>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    let parallelism = parallelism.max(1);
    let mut set = JoinSet::new();
    let mut out = Vec::new();
    for job in jobs {
        while set.len() >= parallelism {
            if let Some(done) = set.join_next().await {
                out.push(flatten(done)?);
            }
        }
        set.spawn(job);
    }
    while let Some(done) = set.join_next().await {
        out.push(flatten(done)?);
    }
    Ok(out)
}

fn flatten<T>(r: Result<Result<T, Error>, tokio::task::JoinError>) -> Result<T, Error> {
    r.map_err(|e| Error::Internal(format!("transfer task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn bounded_and_stops_at_the_first_error() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..20).map(|i| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Error>(i)
            }
        });
        let mut got = run_bounded(jobs, 3).await.unwrap();
        got.sort();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);

        let started = Arc::new(AtomicUsize::new(0));
        let jobs = (0..50).map(|i| {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if i == 2 {
                    return Err(Error::Internal("boom".into()));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(i)
            }
        });
        let e = run_bounded(jobs, 2).await.unwrap_err();
        assert!(e.to_string().contains("boom"));
        assert!(
            started.load(Ordering::SeqCst) < 10,
            "kept starting jobs after the error"
        );
    }
}
