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
use airstate::store::{StateStore, StoreError};
use common::{task_scope as scope, RedisCluster, RedisServer};
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

/// Moves `keys` of `slot` from `source` to `target`, as a reshard does.
fn migrate_keys(source: u16, target: u16, keys: &[&str]) {
    let port = target.to_string();
    let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
    args.extend_from_slice(keys);
    assert_eq!(common::redis_cli(source, &args), "OK", "MIGRATE {keys:?}");
}

fn keys_in_slot(port: u16, slot: &str) -> usize {
    common::redis_cli(port, &["CLUSTER", "COUNTKEYSINSLOT", slot])
        .parse()
        .unwrap()
}

/// Clear-all finds the map indices in the registry, inside its script, so it does not
/// declare their keys; on a slot being migrated it must still delete all or none. The
/// key moved first is the one the registry lists last, so a script that started deleting
/// before knowing every key was local would have deleted the first 1,000 by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_on_a_half_migrated_slot_deletes_nothing_until_it_settles() {
    let cluster = RedisCluster::start();
    let prefix = format!("{}:", unique("clearall"));
    let store = store_on(&cluster.url, &prefix).await;
    let dag = unique("dag");
    let own = scope(&dag, -1);
    // Every scope has an expiring key, so its expiry zset exists too: the EVAL's check of
    // its declared keys passes, and no batch of deletes would meet a key missing anywhere,
    // only the one moved.
    let in_an_hour = airstate::store::now_millis() + 3_600_000;
    store
        .put_task(&own, "k", "1", Some(in_an_hour))
        .await
        .unwrap();
    for index in 0..600 {
        store
            .put_task(&scope(&dag, index), "k", "1", Some(in_an_hour))
            .await
            .unwrap();
    }
    let tag = airstate::store::redis::task_hash_tag(&prefix, &own);
    let slot_number = cluster.slot_of(&tag);
    let slot = slot_number.to_string();
    let source = cluster.primary_of_slot(slot_number);
    let target = [0u16, 5461, 10923]
        .iter()
        .map(|s| cluster.primary_of_slot(*s))
        .find(|p| *p != source)
        .unwrap();
    let registry = format!("{tag}:r");
    let last = common::redis_cli(source, &["HKEYS", &registry])
        .lines()
        .filter_map(|field| field.strip_prefix('m'))
        .rfind(|index| *index != "-1")
        .expect("a map index")
        .to_owned();
    let before = keys_in_slot(source, &slot);
    assert_eq!(before, 1203, "601 scopes, their expiry zsets, the registry");

    let (source_id, target_id) = (RedisCluster::node_id(source), RedisCluster::node_id(target));
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id];
    assert_eq!(common::redis_cli(target, &importing), "OK");
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id];
    assert_eq!(common::redis_cli(source, &migrating), "OK");
    migrate_keys(source, target, &[&format!("{tag}:{last}")]);

    let started = Instant::now();
    let cleared = store.clear_task(&own, true).await;
    let took = started.elapsed();
    let (left, moved) = (keys_in_slot(source, &slot), keys_in_slot(target, &slot));
    println!(
        "clear-all with map index {last} moved: {cleared:?} after {took:?}; \
         {left} + {moved} keys left"
    );
    // Retried while the slot migrates, then a 503, as for TRYAGAIN.
    assert!(
        matches!(cleared, Err(StoreError::Unavailable(_))),
        "a clear-all that cannot reach every key must not succeed: {cleared:?}"
    );
    assert!(took >= Duration::from_millis(1500), "not retried: {took:?}");
    assert_eq!(
        (left, moved),
        (before - 1, 1),
        "a refused clear-all deleted keys"
    );

    // Finish the reshard; the clear then goes through whole.
    loop {
        let keys = common::redis_cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
        if keys.is_empty() {
            break;
        }
        migrate_keys(source, target, &keys.lines().collect::<Vec<_>>());
    }
    let assign = ["CLUSTER", "SETSLOT", &slot, "NODE", &target_id];
    for node in &cluster.nodes {
        common::redis_cli(node.port, &assign);
    }
    store
        .clear_task(&own, true)
        .await
        .expect("clear-all once the slot has settled");
    assert_eq!(keys_in_slot(target, &slot), 0);
    for index in [-1, 0, 599] {
        assert_eq!(
            store.get_task(&scope(&dag, index), "k").await.unwrap(),
            None
        );
    }
}
