//! Redis-specific promises, checked on a real `redis-server`: atomic clear of every map
//! index, memory reclaimed after expiry without keyspace scans, script reloads, and
//! failing fast (503) while Redis or the metastore is down, then recovering.

use crate::common;
use crate::gateway;

use std::time::{Duration, Instant};

use airstate::store::redis::{RedisSettings, RedisStore};
use airstate::store::{now_millis, StateStore};
use common::{redis_cli, task_scope as scope, RedisServer};
use gateway::{ti_path, unique, Backend, Gateway};
use serde_json::json;

/// Keys under `prefix`: a keyspace scan, fine in a test, never in the gateway. SCAN may
/// return a key twice while the keyspace is being rehashed (as after a big clear).
fn keys_under(port: u16, prefix: &str) -> Vec<String> {
    let listed = redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
    let unique: std::collections::BTreeSet<String> = listed
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    unique.into_iter().collect()
}

async fn store_on(server: &RedisServer, prefix: &str) -> RedisStore {
    RedisStore::connect(&RedisSettings {
        pool_size: 4,
        command_timeout: Duration::from_millis(1000),
        sweep_interval: Duration::from_secs(3600),
        ..airstate::config::redis_defaults(&server.url, prefix).unwrap()
    })
    .await
    .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_all_wipes_every_map_index_in_one_script() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("clear"));
    let store = store_on(server, &prefix).await;
    let (dag, neighbour) = (unique("dag"), unique("dag"));
    for index in -1..1000 {
        store
            .put_task(&scope(&dag, index), "k", "1", None)
            .await
            .unwrap();
    }
    store
        .put_task(
            &scope(&dag, 7),
            "expiring",
            "2",
            Some(now_millis() + 60_000),
        )
        .await
        .unwrap();
    store
        .put_task(&scope(&neighbour, 0), "k", "\"stay\"", None)
        .await
        .unwrap();
    assert!(keys_under(server.port, &prefix).len() > 1000);

    store.clear_task(&scope(&dag, 3), true).await.unwrap();
    for index in [-1, 0, 3, 7, 999] {
        assert_eq!(
            store.get_task(&scope(&dag, index), "k").await.unwrap(),
            None,
            "{index}"
        );
    }
    // The clear left the keys stale; the sweeper's reclaim frees them. Then only the other
    // task's scope (hash + registry) is left, besides the sweep index (another slot, so
    // not in the script): its stale entry drops out when it comes due.
    while store.reclaim_once(usize::MAX).await.unwrap() > 0 {}
    let left: Vec<String> = keys_under(server.port, &prefix)
        .into_iter()
        .filter(|key| !key.contains("{sweep:"))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    let kept = store
        .get_task(&scope(&neighbour, 0), "k")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.json, "\"stay\"");
    // Every key of one task shares one hash slot (what makes the script Cluster-safe).
    let slot_prefix = format!("{}:", unique("slots"));
    let slot_store = store_on(server, &slot_prefix).await;
    for index in [-1, 0, 5] {
        let s = scope(&dag, index);
        slot_store.put_task(&s, "k", "1", None).await.unwrap();
        slot_store
            .put_task(&s, "e", "1", Some(now_millis() + 60_000))
            .await
            .unwrap();
    }
    let task_keys: Vec<String> = keys_under(server.port, &slot_prefix)
        .into_iter()
        .filter(|key| !key.contains("{sweep:"))
        .collect();
    assert_eq!(
        task_keys.len(),
        7,
        "3 hashes, 3 expiry sets, 1 registry: {task_keys:?}"
    );
    let slots: std::collections::HashSet<String> = task_keys
        .iter()
        .map(|key| redis_cli(server.port, &["CLUSTER", "KEYSLOT", key]))
        .collect();
    assert_eq!(slots.len(), 1, "{slots:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_scopes_free_their_memory() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("expiry"));
    let store = store_on(server, &prefix).await;
    let dag = unique("dag");
    // Every key expiring: the scope, its expiry index and its registry expire whole.
    for key in ["a", "b"] {
        store
            .put_task(&scope(&dag, 0), key, "1", Some(now_millis() + 700))
            .await
            .unwrap();
    }
    assert_eq!(keys_under(server.port, &prefix).len(), 3);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(keys_under(server.port, &prefix), Vec::<String>::new());

    // A permanent key makes the scope permanent again; the expired one is still never served.
    let mixed = scope(&unique("dag"), 0);
    store
        .put_task(&mixed, "soon", "1", Some(now_millis() + 300))
        .await
        .unwrap();
    store.put_task(&mixed, "forever", "2", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.get_task(&mixed, "soon").await.unwrap(), None);
    assert!(store.get_task(&mixed, "forever").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_reclaims_untouched_mixed_scopes_from_its_index() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("sweep"));
    let store = store_on(server, &prefix).await;
    let mixed = scope(&unique("dag"), 2);
    store.put_task(&mixed, "forever", "1", None).await.unwrap();
    // Due far enough ahead that the first sweep comes before it on a loaded machine (at
    // 300 ms it once did not: the redis-cli calls between took longer).
    let soon_due = now_millis() + 2_000;
    store
        .put_task(&mixed, "soon", "2", Some(soon_due))
        .await
        .unwrap();
    store
        .put_task(&mixed, "later", "3", Some(now_millis() + 60_000))
        .await
        .unwrap();
    let scope_hash = keys_under(server.port, &prefix)
        .into_iter()
        .find(|key| key.ends_with("}:2"))
        .expect("scope hash");
    assert_eq!(redis_cli(server.port, &["HLEN", &scope_hash]), "3");
    assert!(
        now_millis() < soon_due,
        "the setup took past the key's expiry"
    );
    assert_eq!(store.sweep_once().await.unwrap(), 0, "nothing due yet");
    let wait = (soon_due + 100 - now_millis()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    // Nobody reads or writes the scope: only the sweep reclaims the expired key.
    assert_eq!(store.sweep_once().await.unwrap(), 1);
    assert_eq!(redis_cli(server.port, &["HLEN", &scope_hash]), "2");
    assert_eq!(
        redis_cli(server.port, &["HEXISTS", &scope_hash, "soon"]),
        "0"
    );
    // It stays indexed for the key due later, and is not purged again before then.
    assert_eq!(store.sweep_once().await.unwrap(), 0);
    assert!(store.get_task(&mixed, "later").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_a_flush() {
    let server = RedisServer::shared();
    let prefix = format!("{}:", unique("noscript"));
    let store = store_on(server, &prefix).await;
    let s = scope(&unique("dag"), -1);
    store.put_task(&s, "k", "1", None).await.unwrap();
    assert_eq!(redis_cli(server.port, &["SCRIPT", "FLUSH"]), "OK");
    store.put_task(&s, "k", "2", None).await.unwrap();
    store.clear_task(&s, false).await.unwrap();
    assert_eq!(store.get_task(&s, "k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_fast_503_and_the_gateway_recovers() {
    let mut server = RedisServer::start();
    let gw = Gateway::on_redis(&server.url, &[("AIRSTATE_REDIS_TIMEOUT_MS", "500")]).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    assert_eq!(
        gw.put(&path, &ti.token, json!({"value": 1})).await.status,
        204
    );
    server.stop();

    for _ in 0..3 {
        let started = Instant::now();
        let reply = gw.put(&path, &ti.token, json!({"value": 2})).await;
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert!(reply.body["detail"].is_string());
        assert!(took < Duration::from_millis(1500), "503 took {took:?}");
    }
    assert_eq!(gw.send("GET", "/health", None, None).await.status, 200);
    // Reached before, so still ready: degraded, naming Redis (README, "Readiness").
    let ready = gw.send("GET", "/ready", None, None).await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.body["status"], "degraded", "{ready:?}");
    assert!(ready.body["unavailable"]["redis"].is_string(), "{ready:?}");

    server.restart();
    let started = Instant::now();
    loop {
        let reply = gw.put(&path, &ti.token, json!({"value": 3})).await;
        if reply.status == 204 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no recovery: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis came back empty (no persistence here): the new write is what is there.
    assert_eq!(gw.get(&path, &ti.token).await.body, json!({"value": 3}));
    let ready = gw.send("GET", "/ready", None, None).await;
    assert_eq!(ready.body["status"], "ready", "{ready:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metastore_down_is_a_503_not_a_404() {
    let closed = common::free_port();
    let url = format!("postgresql+psycopg2://postgres@127.0.0.1:{closed}/airflow");
    let gw = Gateway::start_with(
        Backend::Memory,
        &[
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &url),
            ("AIRSTATE_METASTORE_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let ti = uuid::Uuid::new_v4();
    let token = gateway::token_for(ti);
    let reply = gw.get(&format!("/execution/store/ti/{ti}/k"), &token).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    let ready = gw.send("GET", "/ready", None, None).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body["detail"]
        .as_str()
        .unwrap()
        .starts_with("not ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_is_a_503_and_reads_still_work() {
    let server =
        RedisServer::start_with_args(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let gw = Gateway::start_with(Backend::Redis, &[("AIRSTATE_REDIS_URL", &server.url)]).await;
    let ti = gw.task().await;
    assert_eq!(
        gw.put(&ti_path(&ti, "first"), &ti.token, json!({"value": 1}))
            .await
            .status,
        204
    );
    let big = "x".repeat(200_000);
    let mut refused = None;
    for i in 0..100 {
        let reply = gw
            .put(
                &ti_path(&ti, &format!("big-{i}")),
                &ti.token,
                json!({"value": big}),
            )
            .await;
        if reply.status != 204 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("Redis never ran out of memory");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        gw.get(&ti_path(&ti, "first"), &ti.token).await.body,
        json!({"value": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_is_a_503_for_writes() {
    let primary = RedisServer::start();
    let port = primary.port.to_string();
    let replica = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &port]);
    let store = store_on(&primary, "ro:").await;
    let mut s = scope(&unique("dag"), -1);
    // The task instance first: the gateway keys its state by the run's dag_run.id.
    let pg = common::Postgres::shared();
    let id = uuid::Uuid::now_v7();
    pg.insert_task_instance(id, &s.dag_id, &s.run_id, &s.task_id, -1)
        .await;
    s.run_key = Some(pg.dag_run_id(&s.dag_id, &s.run_id).await);
    store
        .put_task(&s, "k", "\"from primary\"", None)
        .await
        .unwrap();
    // Pointed at the replica (as after a wrong failover), reads work and writes are 503s.
    let gw = Gateway::start_with(
        Backend::Redis,
        &[
            ("AIRSTATE_REDIS_URL", &replica.url),
            ("AIRSTATE_KEY_PREFIX", "ro:"),
        ],
    )
    .await;
    let ti = gateway::Ti {
        id,
        dag_id: s.dag_id.clone(),
        run_id: s.run_id.clone(),
        task_id: s.task_id.clone(),
        map_index: -1,
        token: gateway::token_for(id),
    };
    let started = Instant::now();
    let read = loop {
        let read = gw.get(&ti_path(&ti, "k"), &ti.token).await;
        if read.status == 200 || started.elapsed() > Duration::from_secs(10) {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        read.body,
        json!({"value": "from primary"}),
        "replica never synced"
    );
    let write = gw
        .put(&ti_path(&ti, "k"), &ti.token, json!({"value": 2}))
        .await;
    assert_eq!(write.status, 503, "{write:?}");
    assert_eq!(write.header("retry-after"), Some("1"));
}
