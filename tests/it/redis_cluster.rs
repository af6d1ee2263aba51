//! Redis Cluster promises, on a real cluster of three primaries and three replicas made
//! by `redis-cli --cluster create`: a slot moving under load is invisible to clients,
//! clear-all stays all-or-nothing while its slot migrates, and a killed primary fails
//! over with every WAIT-confirmed write still readable. Also what change events cost on
//! a Cluster's bus, and that turning them off removes it.
//!
//! Run with `--nocapture` to see the figures each test prints.

use crate::common;
use crate::gateway;

use std::time::{Duration, Instant};

use airstate::store::redis::task_hash_tag;
use airstate::store::TaskScope;
use common::{redis_cli, RedisCluster};
use gateway::load::{quantile, WriteLoad};
use gateway::{ti_path, unique, Gateway, Ti};
use serde_json::json;

/// These tests each run six Redis servers and time what they see; one at a time keeps
/// two cores from blurring the figures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The slot of the task's keys, as the gateway names them (with the run's `dag_run.id`).
async fn slot_of_task(cluster: &RedisCluster, gw: &Gateway, ti: &Ti) -> u16 {
    let scope = TaskScope {
        dag_id: ti.dag_id.clone(),
        run_id: ti.run_id.clone(),
        task_id: ti.task_id.clone(),
        map_index: ti.map_index.into(),
        run_key: Some(gw.pg.dag_run_id(&ti.dag_id, &ti.run_id).await),
    };
    cluster.slot_of(&task_hash_tag(&gw.prefix, &scope))
}

/// A live slot migration, driven the way `redis-cli --cluster reshard` does it, but key
/// by key with pauses so that requests meet the slot half-moved.
struct Migration {
    slot: String,
    source: u16,
    target: u16,
    target_id: String,
}

impl Migration {
    fn begin(cluster: &RedisCluster, slot: u16, target: u16) -> Migration {
        let source = cluster.primary_of_slot(slot);
        assert_ne!(source, target);
        let (source_id, target_id) = (RedisCluster::node_id(source), RedisCluster::node_id(target));
        let slot = slot.to_string();
        let importing = ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id];
        assert_eq!(redis_cli(target, &importing), "OK");
        let migrating = ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id];
        assert_eq!(redis_cli(source, &migrating), "OK");
        Migration {
            slot,
            source,
            target,
            target_id,
        }
    }

    fn keys_left(&self) -> usize {
        redis_cli(self.source, &["CLUSTER", "COUNTKEYSINSLOT", &self.slot])
            .parse()
            .unwrap()
    }

    /// Moves up to `count` keys, one MIGRATE each, pausing `pause` after each.
    fn move_keys(&self, count: usize, pause: Duration) -> usize {
        let port = self.target.to_string();
        for moved in 0..count {
            let key = redis_cli(self.source, &["CLUSTER", "GETKEYSINSLOT", &self.slot, "1"]);
            if key.is_empty() {
                return moved;
            }
            let reply = redis_cli(
                self.source,
                &["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", &key],
            );
            assert_eq!(reply, "OK", "MIGRATE {key}");
            std::thread::sleep(pause);
        }
        count
    }

    /// Hands the slot to the target on every primary, as the last step of a reshard.
    fn finish(self, cluster: &RedisCluster) {
        assert_eq!(self.keys_left(), 0);
        let assign = ["CLUSTER", "SETSLOT", &self.slot, "NODE", &self.target_id];
        assert_eq!(redis_cli(self.target, &assign), "OK");
        assert_eq!(redis_cli(self.source, &assign), "OK");
        for node in &cluster.nodes {
            if node.is_running() && ![self.source, self.target].contains(&node.port) {
                redis_cli(node.port, &assign);
            }
        }
    }
}

/// Another primary than the one serving `slot`.
fn other_primary(cluster: &RedisCluster, slot: u16) -> u16 {
    let source = cluster.primary_of_slot(slot);
    [0u16, 5461, 10923]
        .iter()
        .map(|s| cluster.primary_of_slot(*s))
        .find(|p| *p != source)
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Task instances for 40 map indices of one new task (41 keys in one slot, so moving the
/// slot takes a while), each holding `key` = its map index.
async fn task_with_40_map_indices(gw: &Gateway, key: &str) -> Vec<Ti> {
    let (dag, run) = (unique("dag"), unique("run"));
    let mut tis = Vec::new();
    for index in 0..40 {
        let ti = gw.task_at(&dag, &run, "task", index).await;
        let put = gw
            .put(&ti_path(&ti, key), &ti.token, json!({"value": index}))
            .await;
        assert_eq!(put.status, 204, "{put:?}");
        tis.push(ti);
    }
    tis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_a_slot_under_load_is_transparent() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    // The timeout bounds how long a write may wait out the migration of its slot.
    let gw = Gateway::on_redis(&cluster.url, &[("AIRSTATE_REDIS_TIMEOUT_MS", "5000")]).await;
    let mut tis = task_with_40_map_indices(&gw, "seed").await;
    let slot = slot_of_task(&cluster, &gw, &tis[0]).await;
    let target = other_primary(&cluster, slot);
    let seeds: Vec<Ti> = tis.split_off(8);
    let retries_before = metric(
        &gw.send("GET", "/metrics", None, None).await.text,
        "airstate_redis_retries_total",
    );

    let load = WriteLoad::start(gw.clone(), tis, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let migration = tokio::task::spawn_blocking(move || {
        let migration = Migration::begin(&cluster, slot, target);
        while migration.move_keys(10, Duration::from_millis(10)) > 0 {}
        migration.finish(&cluster);
        cluster
    });
    let cluster = migration.await.unwrap();
    let window = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcomes = load.outcomes();
    let mut during: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.sent_at >= started && o.sent_at <= started + window)
        .map(|o| o.latency)
        .collect();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.status != 204).collect();
    let (acked, refused, lost) = load.stop_and_verify().await;

    assert_eq!(cluster.primary_of_slot(slot), target, "the slot moved");
    let retries = metric(
        &gw.send("GET", "/metrics", None, None).await.text,
        "airstate_redis_retries_total",
    ) - retries_before;
    println!(
        "reshard: slot {slot} moved in {window:?}; {} writes sent meanwhile, p50 {:?}, \
         p99 {:?}, max {:?}; {acked} acknowledged, {refused} refused, {lost} lost; \
         {retries} TRYAGAIN retries inside the gateway",
        during.len(),
        quantile(&mut during, 0.5),
        quantile(&mut during, 0.99),
        quantile(&mut during, 1.0),
    );
    assert!(!during.is_empty(), "no write met the migration");
    assert!(failed.is_empty(), "clients saw the resharding: {failed:?}");
    assert_eq!(lost, 0);
    assert!(retries > 0.0, "the load never met the slot mid-migration");
    // Keys that were only moved, never rewritten, kept their values.
    for ti in &seeds {
        let read = gw.get(&ti_path(ti, "seed"), &ti.token).await;
        assert_eq!(read.body, json!({"value": ti.map_index}), "{read:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_during_a_migration_is_all_or_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let gw = Gateway::on_redis(&cluster.url, &[("AIRSTATE_REDIS_TIMEOUT_MS", "3000")]).await;
    let tis = task_with_40_map_indices(&gw, "k").await;
    let slot = slot_of_task(&cluster, &gw, &tis[0]).await;
    let target = other_primary(&cluster, slot);
    let migration = tokio::task::spawn_blocking(move || {
        let migration = Migration::begin(&cluster, slot, target);
        migration.move_keys(20, Duration::from_millis(5));
        (cluster, migration)
    });
    let (cluster, migration) = migration.await.unwrap();
    let left = migration.keys_left();
    assert!(
        left > 10,
        "half the task's keys still to move: {left} left in slot {slot}"
    );

    // Half the map indices live on each node now. Clear them all while the rest move.
    let clear = {
        let gw = gw.clone();
        let path = format!("/execution/state/ti/{}?all_map_indices=true", tis[0].id);
        let token = tis[0].token.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = gw.delete(&path, &token).await;
            (reply, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        while migration.move_keys(10, Duration::from_millis(20)) > 0 {}
        migration.finish(&cluster);
        cluster
    })
    .await
    .unwrap();
    let (reply, took) = clear.await.unwrap();
    let mut present = 0;
    for ti in &tis {
        let read = gw.get(&ti_path(ti, "k"), &ti.token).await;
        assert!([200, 404].contains(&read.status), "{read:?}");
        present += usize::from(read.status == 200);
    }
    println!(
        "clear-all while its slot migrated: {} after {took:?}; {present} of 40 map indices left",
        reply.status
    );
    match reply.status {
        204 => assert_eq!(present, 0, "a clear that succeeded left map indices behind"),
        503 => assert_eq!(present, 40, "a clear that failed removed map indices"),
        other => panic!("unexpected {other}: {reply:?}"),
    }
    assert_eq!(cluster.primary_of_slot(slot), target);
    // Once the slot has settled, the clear goes through whole.
    let path = format!("/execution/state/ti/{}?all_map_indices=true", tis[0].id);
    assert_eq!(gw.delete(&path, &tis[0].token).await.status, 204);
    for ti in &tis {
        assert_eq!(gw.get(&ti_path(ti, "k"), &ti.token).await.status, 404);
    }
}

/// `count` tasks of different DAGs (their slots spread over the three primaries), the
/// primary serving the first one (the one a test will kill), and which tasks it serves.
async fn tasks_and_a_victim(
    cluster: &RedisCluster,
    gw: &Gateway,
    count: usize,
) -> (Vec<Ti>, u16, Vec<usize>) {
    let mut tis = Vec::new();
    for _ in 0..count {
        tis.push(gw.task().await);
    }
    let mut primaries: Vec<u16> = Vec::with_capacity(tis.len());
    for ti in &tis {
        primaries.push(cluster.primary_of_slot(slot_of_task(cluster, gw, ti).await));
    }
    let victim = primaries[0];
    let on_victim = (0..tis.len()).filter(|i| primaries[*i] == victim).collect();
    (tis, victim, on_victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_and_confirmed_writes_survive() {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let gw = Gateway::on_redis(
        &cluster.url,
        &[
            ("AIRSTATE_REDIS_TIMEOUT_MS", "1000"),
            ("AIRSTATE_REDIS_WAIT_REPLICAS", "1"),
            ("AIRSTATE_REDIS_WAIT_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let (tis, victim, on_victim) = tasks_and_a_victim(&cluster, &gw, 24).await;

    let load = WriteLoad::start(gw.clone(), tis, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.node(victim).stop();
    let killed = Instant::now();
    // The victim's replica takes over its slots once the cluster agrees it failed.
    let slot = slot_of_task(&cluster, &gw, load.ti(on_victim[0])).await;
    let promoted = loop {
        let primary = tokio::task::block_in_place(|| cluster.try_primary_of_slot(slot));
        if primary.is_some_and(|port| port != victim) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // WAIT 1 needs a replica, and the promoted one has none until the killed node is
    // back: restart it, as Kubernetes restarts a pod, and it rejoins as a replica.
    tokio::task::block_in_place(|| cluster.node(victim).restart());
    let rejoined = killed.elapsed();
    let recovered = load
        .wait_for_success_after(&on_victim, killed, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused_on_victim = load
        .outcomes()
        .iter()
        .filter(|o| o.status != 204 && on_victim.contains(&o.writer))
        .count();
    let (acked, refused, lost) = load.stop_and_verify().await;
    let recovered = recovered.map(|at| at - killed);
    println!(
        "cluster failover: primary :{victim} killed; {} of 24 writers on it; replica \
         promoted after {promoted:?}; killed node restarted at {rejoined:?}; WAIT-confirmed \
         writes to its slots acknowledged again {recovered:?} after the kill; {acked} writes \
         acknowledged, {refused} refused ({refused_on_victim} on the killed primary's \
         slots), {lost} lost",
        on_victim.len()
    );
    assert!(
        recovered.is_some(),
        "writes never resumed on the failed-over slots"
    );
    assert_eq!(lost, 0, "an acknowledged write was lost");
    assert!(
        refused > 0,
        "no write was refused: the kill was not exercised"
    );
}

/// fred 10.1 has an open report of a client that keeps targeting a failed primary
/// (fred#363). Here the killed primary stays dead: writes must move to the promoted
/// replica with nothing but the cluster's own failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promotion_while_the_old_primary_stays_dead() {
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let gw = Gateway::on_redis(&cluster.url, &[("AIRSTATE_REDIS_TIMEOUT_MS", "1000")]).await;
    let (tis, victim, on_victim) = tasks_and_a_victim(&cluster, &gw, 12).await;
    let load = WriteLoad::start(gw.clone(), tis, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.node(victim).stop();
    let killed = Instant::now();
    let recovered = load
        .wait_for_success_after(&on_victim, killed, Duration::from_secs(30))
        .await
        .map(|at| at - killed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, refused, lost) = load.stop_and_verify().await;
    println!(
        "cluster failover, old primary left dead, no WAIT: {} of 12 writers on :{victim}; \
         acknowledged again {recovered:?} after the kill; {acked} acknowledged, {refused} \
         refused, {lost} lost (async replication)",
        on_victim.len()
    );
    assert!(
        recovered.is_some(),
        "writes never moved to the promoted replica"
    );
    assert!(refused > 0, "the kill was not exercised");
    assert!(cluster
        .nodes
        .iter()
        .all(|n| n.port != victim || !n.is_running()));
}

/// Publish messages the cluster's nodes have sent each other over the cluster bus.
fn bus_publishes(cluster: &RedisCluster) -> u64 {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let info = redis_cli(node.port, &["CLUSTER", "INFO"]);
            common::info_field(&info, "cluster_stats_messages_publish_sent")
                .map_or(0, |sent| sent.parse().unwrap())
        })
        .sum()
}

/// Why `AIRSTATE_CHANGE_STREAMS=false` exists: on a Cluster each change event crosses
/// the bus to every other node, even with nobody watching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_events_cross_the_cluster_bus_only_when_on() {
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let value = json!({"value": "x".repeat(1024)});
    let mut sent = Vec::new();
    for streams in ["false", "true"] {
        let gw = Gateway::on_redis(&cluster.url, &[("AIRSTATE_CHANGE_STREAMS", streams)]).await;
        let ti = gw.task().await;
        let before = bus_publishes(&cluster);
        for i in 0..20 {
            let put = gw
                .put(&ti_path(&ti, &format!("k{i}")), &ti.token, value.clone())
                .await;
            assert_eq!(put.status, 204, "{put:?}");
        }
        sent.push(bus_publishes(&cluster) - before);
    }
    println!(
        "20 writes of 1 KiB on a 3+3 cluster: publish messages over the cluster bus with \
         change streams off {}, on {}",
        sent[0], sent[1]
    );
    assert_eq!(sent[0], 0, "off: nothing published");
    // The writing primary relays each PUBLISH to the five other nodes.
    assert!(sent[1] >= 20 * 5, "on: {} bus messages", sent[1]);
}
