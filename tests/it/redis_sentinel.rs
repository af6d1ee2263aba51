//! Redis behind Sentinel (a primary, one replica, three sentinels): a failover is
//! followed by the running gateway, with no restart.
//!
//! Run with `--nocapture` to see the figures the test prints.

use crate::common;
use crate::gateway;

use std::time::{Duration, Instant};

use common::{info_field, redis_cli, RedisSentinel};
use gateway::load::WriteLoad;
use gateway::{ti_path, Gateway};
use serde_json::json;

/// Waits until the replica has applied everything the primary has written so far.
fn wait_replicated(sentinel: &RedisSentinel) {
    let offset = |port: u16| -> i64 {
        info_field(
            &redis_cli(port, &["INFO", "replication"]),
            "master_repl_offset",
        )
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
    };
    let target = offset(sentinel.primary.port);
    let started = Instant::now();
    while offset(sentinel.replica.port) < target {
        assert!(started.elapsed() < Duration::from_secs(10), "replica lags");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_without_a_restart() {
    let mut sentinel = RedisSentinel::start();
    let gw = Gateway::on_redis(&sentinel.url, &[("AIRSTATE_REDIS_TIMEOUT_MS", "1000")]).await;
    let before = gw.task().await;
    let put = gw
        .put(
            &ti_path(&before, "kept"),
            &before.token,
            json!({"value": "from before"}),
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");
    tokio::task::block_in_place(|| wait_replicated(&sentinel));

    let mut tis = Vec::new();
    for _ in 0..8 {
        tis.push(gw.task().await);
    }
    let writers: Vec<usize> = (0..tis.len()).collect();
    let load = WriteLoad::start(gw.clone(), tis, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let old_primary = sentinel.primary.port;
    tokio::task::block_in_place(|| sentinel.primary.stop());
    let killed = Instant::now();
    let promoted = loop {
        let announced = tokio::task::block_in_place(|| sentinel.announced_primary());
        if announced == sentinel.replica.port {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovered = load
        .wait_for_success_after(&writers, killed, Duration::from_secs(30))
        .await
        .map(|at| at - killed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (acked, refused, lost) = load.stop_and_verify().await;
    println!(
        "sentinel failover: primary :{old_primary} killed; sentinels promoted :{} after \
         {promoted:?}; every writer acknowledged again {recovered:?} after the kill; \
         {acked} writes acknowledged, {refused} refused, {lost} lost (async replication, \
         no WAIT)",
        sentinel.replica.port
    );
    assert!(
        recovered.is_some(),
        "the gateway never followed the failover"
    );
    assert!(
        refused > 0,
        "no write was refused: the kill was not exercised"
    );
    let read = gw.get(&ti_path(&before, "kept"), &before.token).await;
    assert_eq!(read.body, json!({"value": "from before"}), "{read:?}");
    assert_eq!(gw.send("GET", "/ready", None, None).await.status, 200);
}
