//! A steady write load through a gateway that remembers what was acknowledged, to prove
//! that no acknowledged write is lost across a Redis failure.
//!
//! Each writer PUTs an increasing counter to its own task's key `counter`. After the
//! load, the stored value must lie between the last acknowledged one (anything lower
//! means an acknowledged write was lost) and the last one attempted (an unacknowledged
//! write may or may not have landed).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{ti_path, Gateway, Ti};

/// One answered request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub writer: usize,
    pub sent_at: Instant,
    pub status: u16,
    pub latency: Duration,
    /// The response body, for failures.
    pub detail: String,
}

struct Writer {
    ti: Ti,
    acked: AtomicI64,
    attempted: AtomicI64,
}

pub struct WriteLoad {
    gw: Arc<Gateway>,
    writers: Vec<Arc<Writer>>,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WriteLoad {
    /// One writer per task instance, each pausing `pause` between its requests.
    pub fn start(gw: Arc<Gateway>, tis: Vec<Ti>, pause: Duration) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<Arc<Writer>> = tis
            .into_iter()
            .map(|ti| {
                Arc::new(Writer {
                    ti,
                    acked: AtomicI64::new(-1),
                    attempted: AtomicI64::new(-1),
                })
            })
            .collect();
        let tasks = writers
            .iter()
            .enumerate()
            .map(|(index, writer)| {
                let (gw, writer, stop, outcomes) =
                    (gw.clone(), writer.clone(), stop.clone(), outcomes.clone());
                tokio::spawn(async move {
                    let path = ti_path(&writer.ti, "counter");
                    while !stop.load(Ordering::Relaxed) {
                        let value = writer.attempted.load(Ordering::Relaxed) + 1;
                        writer.attempted.store(value, Ordering::Relaxed);
                        let sent_at = Instant::now();
                        let reply = gw
                            .put(&path, &writer.ti.token, json!({ "value": value }))
                            .await;
                        let status = reply.status;
                        let detail = if status == 204 {
                            String::new()
                        } else {
                            reply.text
                        };
                        if status == 204 {
                            writer.acked.store(value, Ordering::Relaxed);
                        }
                        outcomes.lock().unwrap().push(Outcome {
                            writer: index,
                            sent_at,
                            status,
                            latency: sent_at.elapsed(),
                            detail,
                        });
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        WriteLoad {
            gw,
            writers,
            stop,
            outcomes,
            tasks,
        }
    }

    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    pub fn ti(&self, writer: usize) -> &Ti {
        &self.writers[writer].ti
    }

    /// Waits until each of `writers` had a write acknowledged after `since`, or `limit`
    /// passes; returns when the last of them first succeeded, if all did.
    pub async fn wait_for_success_after(
        &self,
        writers: &[usize],
        since: Instant,
        limit: Duration,
    ) -> Option<Instant> {
        loop {
            let outcomes = self.outcomes();
            let firsts: Vec<Option<Instant>> = writers
                .iter()
                .map(|w| {
                    outcomes
                        .iter()
                        .filter(|o| o.writer == *w && o.status == 204 && o.sent_at >= since)
                        .map(|o| o.sent_at + o.latency)
                        .min()
                })
                .collect();
            if firsts.iter().all(Option::is_some) {
                return firsts.into_iter().flatten().max();
            }
            if since.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the writers, then reads every counter back and checks it against what was
    /// acknowledged. Returns (acknowledged writes, refused writes, writes lost).
    pub async fn stop_and_verify(mut self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            task.await.expect("writer task");
        }
        let outcomes = self.outcomes();
        let acked = outcomes.iter().filter(|o| o.status == 204).count();
        let refused = outcomes.len() - acked;
        let mut lost = 0;
        for writer in &self.writers {
            let acked = writer.acked.load(Ordering::Relaxed);
            let attempted = writer.attempted.load(Ordering::Relaxed);
            let path = ti_path(&writer.ti, "counter");
            // Reads may briefly fail while a topology settles; they are not the subject.
            let mut read = self.gw.get(&path, &writer.ti.token).await;
            let started = Instant::now();
            while read.status >= 500 && started.elapsed() < Duration::from_secs(15) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                read = self.gw.get(&path, &writer.ti.token).await;
            }
            let stored = match read.status {
                200 => read.body["value"].as_i64().expect("counter value"),
                404 => -1,
                _ => panic!("reading back {path}: {read:?}"),
            };
            assert!(
                stored <= attempted,
                "{path}: stored {stored}, never attempted past {attempted}"
            );
            if stored < acked {
                eprintln!("LOST: {path} holds {stored}, but {acked} was acknowledged");
                lost += 1;
            }
        }
        (acked, refused, lost)
    }
}

/// The `q`-quantile of `samples` (nearest rank).
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let rank = ((samples.len() as f64) * q).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}
