//! Clear of every map index of a task while writers keep adding map indices to it
//! (issue 15 item 7): the clear must never give up (503) however fast the task grows, and
//! it stays all-or-nothing: once it returns, nothing written before it began is readable.
//! On a standalone Redis and on a Cluster.
//!
//! Run with `--nocapture` to see the figures each test prints.

use crate::common;
use crate::gateway;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airstate::store::redis::{RedisSettings, RedisStore};
use airstate::store::{StateStore, TaskScope};
use common::{RedisCluster, RedisServer};
use gateway::unique;

/// Map indices each writer adds before a clear, clears per test, writers.
const PER_WRITER_BEFORE_CLEAR: usize = 500;
const ROUNDS: usize = 8;
const WRITERS: i64 = 4;

async fn store_on(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(&RedisSettings {
        pool_size: 4,
        command_timeout: Duration::from_millis(2000),
        sweep_interval: Duration::from_secs(3600),
        ..airstate::config::redis_defaults(url, prefix).unwrap()
    })
    .await
    .expect("connect")
}

fn scope(dag: &str, map_index: i64) -> TaskScope {
    TaskScope {
        dag_id: dag.into(),
        run_id: "run".into(),
        task_id: "task".into(),
        map_index,
        run_key: None,
    }
}

/// Runs `ROUNDS` clear-alls of one task, each once the writers have added
/// `PER_WRITER_BEFORE_CLEAR` new map indices each, while they keep adding more. Returns
/// the clears that failed (with why) and the map indices readable after a clear although
/// written before it began.
async fn clears_under_writers(url: &str) -> (Vec<String>, Vec<i64>) {
    let prefix = format!("{}:", unique("clearall"));
    let store = Arc::new(store_on(url, &prefix).await);
    let dag = unique("dag");
    // Map indices acknowledged, in order; each is written once, so one acknowledged
    // before a clear began must be gone once the clear returns.
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next_index = Arc::new(AtomicI64::new(0));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (store, dag, acked, stop, next_index) = (
            store.clone(),
            dag.clone(),
            acked.clone(),
            stop.clone(),
            next_index.clone(),
        );
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                match store.put_task(&scope(&dag, index), "k", "1", None).await {
                    Ok(()) => acked.lock().unwrap().push(index),
                    Err(error) => panic!("write of map index {index} failed: {error}"),
                }
            }
        }));
    }

    let (mut failures, mut survivors) = (Vec::new(), Vec::new());
    let mut seen = 0;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let wanted = seen + PER_WRITER_BEFORE_CLEAR * WRITERS as usize;
        while acked.lock().unwrap().len() < wanted {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before: Vec<i64> = acked.lock().unwrap().clone();
        seen = before.len();
        if let Err(error) = store.clear_task(&scope(&dag, -1), true).await {
            failures.push(format!("round {round}: {error}"));
            continue;
        }
        for chunk in before.chunks(256) {
            let reads = chunk
                .iter()
                .map(|&index| {
                    let store = store.clone();
                    let dag = dag.clone();
                    async move { (index, store.get_task(&scope(&dag, index), "k").await) }
                })
                .collect::<Vec<_>>();
            for (index, read) in futures_util::future::join_all(reads).await {
                if read.expect("read after a clear").is_some() {
                    survivors.push(index);
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    println!(
        "{ROUNDS} clear-alls under {WRITERS} writers ({} map indices written in {:?}): \
         {} failed, {} values survived a clear",
        acked.lock().unwrap().len(),
        started.elapsed(),
        failures.len(),
        survivors.len()
    );
    (failures, survivors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_never_gives_up_under_writers_on_standalone() {
    let (failures, survivors) = clears_under_writers(&RedisServer::shared().url).await;
    assert!(failures.is_empty(), "clear-all failed: {failures:?}");
    assert!(survivors.is_empty(), "survived a clear: {survivors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_never_gives_up_under_writers_on_a_cluster() {
    let (failures, survivors) = clears_under_writers(&RedisCluster::shared().url).await;
    assert!(failures.is_empty(), "clear-all failed: {failures:?}");
    assert!(survivors.is_empty(), "survived a clear: {survivors:?}");
}
