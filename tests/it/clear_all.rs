//! Clear of every map index of a task (issue 15 item 7). It raises the task's generation
//! and nothing else: O(1) Redis time however many map indices it clears, it never gives up
//! (503) however fast writers add map indices, and it is all-or-nothing: once it returns,
//! nothing written before it began is readable, anywhere (reads, lists, bulk reads,
//! preconditions, export), and nothing comes back later (a write to a cleared scope, the
//! registry emptying and starting over). The sweeper reclaims the stale keys in bounded
//! passes. On a standalone Redis and on a Cluster, during a slot migration too.
//!
//! Run with `--nocapture` to see the figures each test prints.

use crate::common;
use crate::gateway;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airstate::store::redis::{RedisSettings, RedisStore};
use airstate::store::version::{Condition, Tags, Written};
use airstate::store::StateStore;
use common::{info_field, redis_cli, task_scope as scope, RedisCluster, RedisServer};
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
    assert_eq!(redis_cli(source, &args), "OK", "MIGRATE {keys:?}");
}

fn keys_in_slot(port: u16, slot: &str) -> usize {
    redis_cli(port, &["CLUSTER", "COUNTKEYSINSLOT", slot])
        .parse()
        .unwrap()
}

/// Keys under `prefix` (a keyspace scan: fine in a test, never in the gateway), deduplicated
/// (SCAN may return a key twice while the keyspace is rehashed).
fn keys_under(port: u16, prefix: &str) -> Vec<String> {
    let listed = redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
    let unique: std::collections::BTreeSet<String> = listed
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    unique.into_iter().collect()
}

/// Writes `key` in map indices `indices` of `dag`, 64 at a time.
async fn fill(store: &RedisStore, dag: &str, indices: std::ops::Range<i64>, key: &str) {
    use futures_util::StreamExt;
    futures_util::stream::iter(indices)
        .map(|index| async move {
            store
                .put_task(&scope(dag, index), key, "1", None)
                .await
                .unwrap()
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// `usec` and `calls` of one command in `INFO commandstats`.
fn command_stats(port: u16, command: &str) -> (u64, u64) {
    let listing = redis_cli(port, &["INFO", "commandstats"]);
    let Some(line) = info_field(&listing, &format!("cmdstat_{command}")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        line.split(',')
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    (field("usec"), field("calls"))
}

/// The Redis main-thread time of a clear-all does not grow with the map indices: 10,000 of
/// them cost one HINCRBY, where the script that unlinked each took ~146 ms (measured on
/// this machine; EVALSHA usec in `INFO commandstats`). Prints the cost of a read as well:
/// the pipelined HMGET of the registry plus the HGET, against the HGET alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_of_10000_map_indices_costs_redis_constant_time() {
    let server = RedisServer::start();
    let prefix = format!("{}:", unique("o1"));
    let store = store_on(&server.url, &prefix).await;
    let dag = unique("dag");
    fill(&store, &dag, 0..10_000, "k").await;

    assert_eq!(redis_cli(server.port, &["CONFIG", "RESETSTAT"]), "OK");
    store.clear_task(&scope(&dag, 0), true).await.unwrap();
    let (usec, calls) = command_stats(server.port, "evalsha");
    println!("clear-all of 10,000 map indices: {usec} µs of Redis time in {calls} EVALSHA");
    assert_eq!(calls, 1);
    assert!(usec < 5_000, "clear-all took {usec} µs of Redis time");
    for index in [0, 4_999, 9_999] {
        assert_eq!(
            store.get_task(&scope(&dag, index), "k").await.unwrap(),
            None
        );
    }

    let live = unique("dag");
    fill(&store, &live, 0..1, "k").await;
    assert_eq!(redis_cli(server.port, &["CONFIG", "RESETSTAT"]), "OK");
    for _ in 0..2_000 {
        assert!(store
            .get_task(&scope(&live, 0), "k")
            .await
            .unwrap()
            .is_some());
    }
    let (hget, hget_calls) = command_stats(server.port, "hget");
    let (hmget, hmget_calls) = command_stats(server.port, "hmget");
    assert_eq!((hget_calls, hmget_calls), (2_000, 2_000));
    println!(
        "GET: HGET {:.3} µs + HMGET {:.3} µs of Redis time per read",
        hget as f64 / 2_000.0,
        hmget as f64 / 2_000.0
    );
}

/// After a clear-all nothing of before is readable, by any read, and a write to a cleared
/// scope starts from empty: its other old keys do not come back, and `If-None-Match: *`
/// holds for a key that was set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clear_all_every_read_is_empty_and_writes_start_afresh() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("afresh"));
    let store = store_on(&server.url, &prefix).await;
    let dag = unique("dag");
    fill(&store, &dag, -1..50, "a").await;
    fill(&store, &dag, -1..50, "b").await;
    let in_an_hour = airstate::store::now_millis() + 3_600_000;
    store
        .put_task(&scope(&dag, 7), "soon", "1", Some(in_an_hour))
        .await
        .unwrap();

    store.clear_task(&scope(&dag, -1), true).await.unwrap();
    let names = ["a".to_owned(), "b".to_owned(), "soon".to_owned()];
    for index in -1..50 {
        let cleared = scope(&dag, index);
        assert_eq!(store.get_task(&cleared, "a").await.unwrap(), None);
        assert_eq!(store.list_task(&cleared).await.unwrap(), vec![]);
        let many = store
            .get_task_many(&cleared, &names, 1 << 20)
            .await
            .unwrap();
        assert_eq!(many, vec![None, None, None], "{index}");
    }

    let only_a = Condition {
        if_match: None,
        if_none_match: Some(Tags::Any),
    };
    let written = store
        .put_task_if(&scope(&dag, 7), "a", "2", None, &only_a)
        .await
        .unwrap();
    assert!(matches!(written, Written::Applied(_)), "{written:?}");
    let listed: Vec<String> = store
        .list_task(&scope(&dag, 7))
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.key)
        .collect();
    assert_eq!(listed, vec!["a"], "old keys came back with the new write");
    assert_eq!(store.get_task(&scope(&dag, 7), "b").await.unwrap(), None);
    assert_eq!(store.get_task(&scope(&dag, 7), "soon").await.unwrap(), None);
    assert_eq!(
        store
            .get_task(&scope(&dag, 7), "a")
            .await
            .unwrap()
            .unwrap()
            .json,
        "2"
    );
    // A delete of a cleared scope's old key deletes nothing and revives nothing.
    store.delete_task(&scope(&dag, 8), "b").await.unwrap();
    assert_eq!(store.get_task(&scope(&dag, 8), "a").await.unwrap(), None);
    // Export lists only the map index written since.
    let tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&dag, 0));
    match store.scope_of_key(&format!("{tag}:r")).await.unwrap() {
        Some(airstate::store::redis::ScopeRef::Task(scopes)) => {
            let indices: Vec<i64> = scopes.iter().map(|s| s.map_index).collect();
            assert_eq!(indices, vec![7]);
        }
        other => panic!("{other:?}"),
    }
}

/// The registry empties and starts over at generation 0 only when no scope holds data, so
/// the old generation's values never come back: not when the last live key goes before
/// the reclaimer ran, nor after it ran, nor after a clear of one map index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_registry_never_brings_old_values_back() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("restart"));
    let store = store_on(&server.url, &prefix).await;
    let dag = unique("dag");
    fill(&store, &dag, 0..10, "old").await;
    let registry = format!(
        "{}:r",
        airstate::store::redis::task_hash_tag(&prefix, &scope(&dag, 0))
    );
    let old_gone = async |store: &RedisStore| {
        for index in 0..10 {
            assert_eq!(
                store.get_task(&scope(&dag, index), "old").await.unwrap(),
                None,
                "map index {index} came back"
            );
        }
    };

    // Before reclaiming: the stale fields keep the registry (and its generation) alive.
    store.clear_task(&scope(&dag, 0), true).await.unwrap();
    store
        .put_task(&scope(&dag, 20), "new", "1", None)
        .await
        .unwrap();
    store.delete_task(&scope(&dag, 20), "new").await.unwrap();
    old_gone(&store).await;
    store
        .put_task(&scope(&dag, 21), "new", "1", None)
        .await
        .unwrap();
    store.clear_task(&scope(&dag, 21), false).await.unwrap();
    old_gone(&store).await;
    assert_eq!(redis_cli(server.port, &["HGET", &registry, "g"]), "1");

    // Once reclaimed, the emptied registry goes and a new one starts at 0.
    store
        .put_task(&scope(&dag, 22), "new", "1", None)
        .await
        .unwrap();
    while store.reclaim_once(usize::MAX).await.unwrap() > 0 {}
    assert_eq!(
        redis_cli(server.port, &["HLEN", &registry]),
        "5",
        "identity, g, m22"
    );
    store.delete_task(&scope(&dag, 22), "new").await.unwrap();
    assert_eq!(redis_cli(server.port, &["EXISTS", &registry]), "0");
    old_gone(&store).await;
    fill(&store, &dag, 5..6, "other").await;
    old_gone(&store).await;
    assert_eq!(redis_cli(server.port, &["HGET", &registry, "g"]), "");
}

/// The sweeper's reclaim frees every stale key in passes bounded by the registry fields
/// they look at, resuming where the last one stopped, and leaves live keys alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reclaimer_frees_every_stale_key_in_bounded_passes() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("reclaim"));
    let store = store_on(&server.url, &prefix).await;
    let (dag, neighbour) = (unique("dag"), unique("dag"));
    fill(&store, &dag, 0..3_000, "k").await;
    let in_an_hour = airstate::store::now_millis() + 3_600_000;
    for index in [3, 1_500] {
        store
            .put_task(&scope(&dag, index), "soon", "1", Some(in_an_hour))
            .await
            .unwrap();
    }
    fill(&store, &neighbour, 0..3, "k").await;
    let before = keys_under(server.port, &prefix)
        .iter()
        .filter(|key| !key.contains("{sweep:"))
        .count();
    assert_eq!(
        before,
        3_000 + 2 + 1 + 3 + 1,
        "scopes, expiry sets, registries"
    );

    store.clear_task(&scope(&dag, 0), true).await.unwrap();
    // Written after the clear: live, and kept.
    store
        .put_task(&scope(&dag, 3), "after", "1", None)
        .await
        .unwrap();
    store
        .put_task(&scope(&dag, 5_000), "after", "1", None)
        .await
        .unwrap();
    // Not yet reclaimed: still there, only unreadable.
    assert!(keys_under(server.port, &prefix).len() > 3_000);

    let mut passes = 0;
    let mut reclaimed = 0;
    loop {
        let count = store.reclaim_once(700).await.unwrap();
        passes += 1;
        assert!(count <= 1_000 + 100, "a pass went past its bound: {count}");
        reclaimed += count;
        if count == 0 || passes > 20 {
            break;
        }
    }
    println!("reclaimed {reclaimed} stale scopes in {passes} passes of at most 700 fields");
    assert!(passes >= 4, "not bounded: {passes} passes");
    assert_eq!(reclaimed, 2_999, "every stale scope but the one rewritten");
    let tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&dag, 0));
    let neighbour_tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&neighbour, 0));
    let mut expected: Vec<String> = [
        format!("{tag}:3"),
        format!("{tag}:5000"),
        format!("{tag}:r"),
        format!("{neighbour_tag}:0"),
        format!("{neighbour_tag}:1"),
        format!("{neighbour_tag}:2"),
        format!("{neighbour_tag}:r"),
    ]
    .into();
    expected.sort();
    let left: Vec<String> = keys_under(server.port, &prefix)
        .into_iter()
        .filter(|key| !key.contains("{sweep:"))
        .collect();
    assert_eq!(
        left, expected,
        "only live keys are left, and no reclaim index"
    );
    for index in [3, 5_000] {
        let value = store.get_task(&scope(&dag, index), "after").await.unwrap();
        assert!(value.is_some(), "{index}");
    }
    assert_eq!(store.get_task(&scope(&dag, 3), "k").await.unwrap(), None);
    assert!(store
        .get_task(&scope(&neighbour, 2), "k")
        .await
        .unwrap()
        .is_some());
}

/// A clear-all on a slot being migrated touches only the registry, so it succeeds at once
/// wherever the other keys are, and deletes nothing yet: the moved map index reads as
/// cleared as soon as the slot has settled, like every other one, and the reclaimer then
/// frees them all on the new owner. (The script that unlinked every map index had to
/// refuse such a clear whole, and retried it until the slot settled or the timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_on_a_half_migrated_slot_is_immediate_and_whole() {
    let cluster = RedisCluster::start();
    let prefix = format!("{}:", unique("clearall"));
    let store = store_on(&cluster.url, &prefix).await;
    let dag = unique("dag");
    let own = scope(&dag, -1);
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
    let before = keys_in_slot(source, &slot);
    assert_eq!(before, 1203, "601 scopes, their expiry zsets, the registry");

    let (source_id, target_id) = (RedisCluster::node_id(source), RedisCluster::node_id(target));
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id];
    assert_eq!(redis_cli(target, &importing), "OK");
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id];
    assert_eq!(redis_cli(source, &migrating), "OK");
    migrate_keys(
        source,
        target,
        &[&format!("{tag}:599"), &format!("{tag}:599:x")],
    );

    let started = Instant::now();
    store.clear_task(&own, true).await.expect("clear-all");
    let took = started.elapsed();
    let (left, moved) = (keys_in_slot(source, &slot), keys_in_slot(target, &slot));
    println!("clear-all with map index 599 moved: {took:?}; {left} + {moved} keys left");
    assert!(
        took < Duration::from_millis(500),
        "waited for the slot: {took:?}"
    );
    assert_eq!((left, moved), (before - 2, 2), "nothing deleted yet");
    // What stayed on the source reads as cleared at once.
    for index in [-1, 0, 598] {
        assert_eq!(
            store.get_task(&scope(&dag, index), "k").await.unwrap(),
            None
        );
    }

    // Finish the reshard.
    loop {
        let keys = redis_cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
        if keys.is_empty() {
            break;
        }
        migrate_keys(source, target, &keys.lines().collect::<Vec<_>>());
    }
    let assign = ["CLUSTER", "SETSLOT", &slot, "NODE", &target_id];
    for node in &cluster.nodes {
        redis_cli(node.port, &assign);
    }
    for index in [-1, 0, 599] {
        assert_eq!(
            store.get_task(&scope(&dag, index), "k").await.unwrap(),
            None
        );
    }
    let mut reclaimed = 0;
    for _ in 0..5 {
        reclaimed += store.reclaim_once(usize::MAX).await.unwrap();
    }
    assert_eq!(reclaimed, 601);
    assert_eq!(keys_in_slot(target, &slot), 0, "the reclaimer left keys");
}

/// Clear-alls while the task's whole slot is moved key by key and a writer keeps adding
/// map indices: no clear is refused for anything but the slot moving (503, retried
/// inside), none fails half way, and once the slot has settled nothing acknowledged
/// before a clear that succeeded is readable. The registry moves too, at some point, so
/// clears meet it on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_while_the_slot_migrates_key_by_key_stays_whole() {
    let cluster = RedisCluster::start();
    let prefix = format!("{}:", unique("moving"));
    let store = Arc::new(store_on(&cluster.url, &prefix).await);
    let dag = unique("dag");
    fill(&store, &dag, 0..300, "k").await;
    let tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&dag, 0));
    let slot_number = cluster.slot_of(&tag);
    let slot = slot_number.to_string();
    let source = cluster.primary_of_slot(slot_number);
    let target = [0u16, 5461, 10923]
        .iter()
        .map(|s| cluster.primary_of_slot(*s))
        .find(|p| *p != source)
        .unwrap();
    let (source_id, target_id) = (RedisCluster::node_id(source), RedisCluster::node_id(target));
    let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id];
    assert_eq!(redis_cli(target, &importing), "OK");
    let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id];
    assert_eq!(redis_cli(source, &migrating), "OK");
    let nodes: Vec<u16> = cluster.nodes.iter().map(|node| node.port).collect();
    let mover = std::thread::spawn({
        let slot = slot.clone();
        move || {
            loop {
                let keys = redis_cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "3"]);
                if keys.is_empty() {
                    break;
                }
                migrate_keys(source, target, &keys.lines().collect::<Vec<_>>());
                std::thread::sleep(Duration::from_millis(5));
            }
            let assign = ["CLUSTER", "SETSLOT", &slot, "NODE", &target_id];
            for port in nodes {
                redis_cli(port, &assign);
            }
        }
    });

    let acked: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new((0..300).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (store, dag, acked, stop) = (store.clone(), dag.clone(), acked.clone(), stop.clone());
        async move {
            let mut index = 300;
            while !stop.load(Ordering::Relaxed) {
                // A write meeting a moved key waits for the slot like any other; one that
                // gives up (503) is simply not acknowledged.
                if store
                    .put_task(&scope(&dag, index), "k", "1", None)
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap().push(index);
                }
                index += 1;
            }
        }
    });
    let (mut cleared, mut refused, mut before_last_clear) = (0, 0, Vec::new());
    while !mover.is_finished() {
        let before: Vec<i64> = acked.lock().unwrap().clone();
        match store.clear_task(&scope(&dag, 0), true).await {
            Ok(()) => {
                cleared += 1;
                before_last_clear = before;
            }
            Err(airstate::store::StoreError::Unavailable(_)) => refused += 1,
            Err(error) => panic!("clear-all failed during the migration: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mover.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    println!(
        "during the migration: {cleared} clear-alls applied, {refused} answered 503 (slot \
         moving); {} map indices acknowledged",
        acked.lock().unwrap().len()
    );
    assert!(cleared > 0, "no clear-all got through during the migration");
    let mut survivors = Vec::new();
    for index in before_last_clear {
        if store
            .get_task(&scope(&dag, index), "k")
            .await
            .unwrap()
            .is_some()
        {
            survivors.push(index);
        }
    }
    assert!(survivors.is_empty(), "survived a clear: {survivors:?}");
}

/// A store clearing as airstate before generations did (`AIRSTATE_CLEAR_ALL=unlink`).
async fn unlinking_store_on(url: &str, prefix: &str) -> RedisStore {
    RedisStore::connect(&RedisSettings {
        pool_size: 4,
        command_timeout: Duration::from_millis(2000),
        sweep_interval: Duration::from_secs(3600),
        clear_all: airstate::store::redis::ClearAll::Unlink,
        ..airstate::config::redis_defaults(url, prefix).unwrap()
    })
    .await
    .expect("connect")
}

/// The two steps README's "Upgrading from an airstate before generations" gives: with
/// `unlink`, a clear-all leaves nothing an older replica could misread (no `g`, no stale
/// scope: its own writes of `m<index>` = "1" stay current), even for a task a `generation`
/// replica had cleared before; and before a rollback, `airstate_reclaim_pending` reaching 0
/// means every stale scope is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_unlink_leaves_what_an_older_replica_reads_right() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("unlink"));
    let new = store_on(&server.url, &prefix).await;
    let old_style = unlinking_store_on(&server.url, &prefix).await;
    let (dag, rolled_back) = (unique("dag"), unique("dag"));
    let tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&dag, 0));
    let registry = format!("{tag}:r");

    // Mixed fleet: a generation clear, then writes, then an unlink clear.
    fill(&new, &dag, 0..300, "k").await;
    new.clear_task(&scope(&dag, 0), true).await.unwrap();
    assert_eq!(redis_cli(server.port, &["HGET", &registry, "g"]), "1");
    fill(&new, &dag, 0..5, "again").await;
    old_style.clear_task(&scope(&dag, 0), true).await.unwrap();
    assert_eq!(
        keys_under(server.port, &tag),
        Vec::<String>::new(),
        "every scope (stale or not), expiry set and the registry with its g deleted at once"
    );
    for store in [&new, &old_style] {
        assert_eq!(
            store.get_task(&scope(&dag, 3), "again").await.unwrap(),
            None
        );
        assert_eq!(store.get_task(&scope(&dag, 3), "k").await.unwrap(), None);
    }
    // What an older replica writes after it (task_write.lua of before: HSETNX m<index> 1
    // and the value) is current for every replica.
    let scope_key = format!("{tag}:7");
    let value = "1.v1::\"old\"";
    assert_eq!(
        redis_cli(server.port, &["HSET", &scope_key, "from_old", value]),
        "1"
    );
    redis_cli(server.port, &["HSETNX", &registry, "m7", "1"]);
    for store in [&new, &old_style] {
        let read = store.get_task(&scope(&dag, 7), "from_old").await.unwrap();
        assert_eq!(read.map(|v| v.json), Some("\"old\"".to_owned()));
    }

    // Before a rollback: stale scopes of a generation clear are counted until reclaimed.
    fill(&new, &rolled_back, 0..1_200, "k").await;
    new.clear_task(&scope(&rolled_back, 0), true).await.unwrap();
    assert!(old_style.reclaim_pending().await.unwrap() >= 1);
    let stale_tag = airstate::store::redis::task_hash_tag(&prefix, &scope(&rolled_back, 0));
    assert!(keys_under(server.port, &stale_tag).len() > 1_000);
    let mut passes = 0;
    while old_style.reclaim_pending().await.unwrap() > 0 {
        old_style.reclaim_once(500).await.unwrap();
        passes += 1;
        assert!(passes < 50, "reclaim never finished");
    }
    assert_eq!(
        keys_under(server.port, &stale_tag),
        Vec::<String>::new(),
        "pending 0: nothing stale left for an older replica to serve"
    );
}
