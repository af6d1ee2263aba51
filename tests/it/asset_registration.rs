//! The opt-in asset registration check (`AIRSTATE_ASSET_REGISTRATION_CHECK=true`) against
//! real `task_inlet_asset_reference` / `task_outlet_asset_reference` rows, on both stores.

use crate::gateway;

use std::time::{Duration, Instant};

use gateway::{by_name, enc, token_for, unique, Asset, Backend, Gateway, Ti};
use serde_json::json;
use uuid::Uuid;

on_every_store!(
    inlets_and_outlets_may_use_the_asset_and_others_get_403,
    a_new_registration_is_seen_at_once_and_a_removed_one_within_the_cache_window,
    the_check_is_off_unless_asked_for,
);

const CHECK: (&str, &str) = ("AIRSTATE_ASSET_REGISTRATION_CHECK", "true");

/// Registers `ti`'s task with `asset` in `table` (`inlet` or `outlet`).
async fn register(gw: &Gateway, table: &str, asset: &Asset, dag_id: &str, task_id: &str) {
    let extra = if table == "outlet" {
        ", allow_global_consumers"
    } else {
        ""
    };
    let value = if table == "outlet" { ", true" } else { "" };
    gw.pg
        .client()
        .await
        .execute(
            &format!(
                "INSERT INTO task_{table}_asset_reference \
                 (asset_id, dag_id, task_id, created_at, updated_at{extra}) \
                 VALUES ($1, $2, $3, now(), now(){value})"
            ),
            &[&asset.id, &dag_id, &task_id],
        )
        .await
        .expect("insert asset reference");
}

async fn unregister(gw: &Gateway, table: &str, asset: &Asset, ti: &Ti) {
    gw.pg
        .client()
        .await
        .execute(
            &format!(
                "DELETE FROM task_{table}_asset_reference \
                 WHERE asset_id = $1 AND dag_id = $2 AND task_id = $3"
            ),
            &[&asset.id, &ti.dag_id, &ti.task_id],
        )
        .await
        .expect("delete asset reference");
}

/// Every asset route a task may call, as (method, path, body).
fn routes(a: &Asset) -> Vec<(&'static str, String, Option<serde_json::Value>)> {
    let name = enc(&a.name);
    let uri = enc(&a.uri);
    vec![
        ("GET", by_name(a, "k"), None),
        ("PUT", by_name(a, "k"), Some(json!({"value": "mine"}))),
        ("DELETE", by_name(a, "other"), None),
        (
            "GET",
            format!("/execution/store/asset/by-uri/value?uri={uri}&key=k"),
            None,
        ),
        (
            "GET",
            format!("/execution/store/asset/by-name/values?name={name}&keys=k"),
            None,
        ),
        (
            "POST",
            format!("/execution/store/asset/by-uri/values?uri={uri}"),
            Some(json!({"keys": ["k"]})),
        ),
        ("GET", format!("/execution/state/asset/{name}/k"), None),
        (
            "PUT",
            format!("/execution/state/asset/{name}/k"),
            Some(json!({"value": "mine"})),
        ),
        (
            "DELETE",
            format!("/execution/store/asset/by-name/clear?name={name}"),
            None,
        ),
        ("DELETE", format!("/execution/state/asset/{name}"), None),
    ]
}

async fn inlets_and_outlets_may_use_the_asset_and_others_get_403(backend: Backend) {
    let gw = Gateway::start_with(backend, &[CHECK]).await;
    let dag = unique("dag");
    let run = unique("run");
    let reader = gw.task_at(&dag, &run, "reader", -1).await;
    let writer = gw.task_at(&dag, &run, "writer", -1).await;
    let stranger = gw.task_at(&dag, &run, "stranger", -1).await;
    // The same task id in another DAG is another task.
    let lookalike = gw.task_at(&unique("dag"), &run, "reader", -1).await;
    let a = gw.asset().await;
    register(&gw, "inlet", &a, &dag, "reader").await;
    register(&gw, "outlet", &a, &dag, "writer").await;

    let seeded = gw
        .put(&by_name(&a, "k"), &writer.token, json!({"value": "seed"}))
        .await;
    assert_eq!(seeded.status, 204, "{seeded:?}");
    for ti in [&stranger, &lookalike] {
        for (method, path, body) in routes(&a) {
            let reply = gw.send(method, &path, Some(&ti.token), body).await;
            assert_eq!(reply.status, 403, "{method} {path}: {reply:?}");
            assert_eq!(reply.body["detail"]["reason"], "asset_not_registered");
            let message = reply.body["detail"]["message"].as_str().unwrap();
            let who = format!("Task '{}' of DAG '{}'", ti.task_id, ti.dag_id);
            assert!(message.starts_with(&who), "{message}");
            assert!(message.contains("inlet or outlet"), "{message}");
        }
    }
    // Refused requests changed nothing.
    let kept = gw.get(&by_name(&a, "k"), &reader.token).await;
    assert_eq!(kept.body, json!({"value": "seed"}));
    // An inlet and an outlet may use every route.
    for ti in [&reader, &writer] {
        for (method, path, body) in routes(&a) {
            let reply = gw.send(method, &path, Some(&ti.token), body).await;
            assert!(
                [200, 204, 404].contains(&reply.status),
                "{} {method} {path}: {reply:?}",
                ti.task_id
            );
            if reply.status == 404 {
                assert_eq!(reply.body["detail"]["reason"], "not_found", "{reply:?}");
            }
        }
    }
    // Watchers (the all-zero subject) belong to no task and are not checked.
    let watcher = token_for(Uuid::nil());
    let watched = gw
        .put(&by_name(&a, "k"), &watcher, json!({"value": "event"}))
        .await;
    assert_eq!(watched.status, 204, "{watched:?}");
    // A token whose task instance is gone cannot be checked: Airflow's 404.
    let ghost = gw.get(&by_name(&a, "k"), &token_for(Uuid::new_v4())).await;
    assert_eq!(ghost.status, 404, "{ghost:?}");
}

async fn a_new_registration_is_seen_at_once_and_a_removed_one_within_the_cache_window(
    backend: Backend,
) {
    // The test gateway trusts identity answers for 1 s (AIRSTATE_IDENTITY_CACHE_SECONDS).
    let gw = Gateway::start_with(backend, &[CHECK]).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let path = by_name(&a, "k");
    assert_eq!(gw.get(&path, &ti.token).await.status, 403);
    // Refusals are not cached: the registration counts from the next request.
    register(&gw, "outlet", &a, &ti.dag_id, &ti.task_id).await;
    let put = gw.put(&path, &ti.token, json!({"value": 1})).await;
    assert_eq!(put.status, 204, "{put:?}");
    unregister(&gw, "outlet", &a, &ti).await;
    let removed = Instant::now();
    loop {
        let reply = gw.get(&path, &ti.token).await;
        if reply.status == 403 {
            break;
        }
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "a removed registration was still honoured after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn the_check_is_off_unless_asked_for(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    for (method, path, body) in routes(&a) {
        let reply = gw.send(method, &path, Some(&ti.token), body).await;
        assert_ne!(reply.status, 403, "{method} {path}: {reply:?}");
    }
}
