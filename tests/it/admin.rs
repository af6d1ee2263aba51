//! The admin API (`/admin/v1/...`): every route, its own credential, Airflow's
//! `max_value_storage_bytes`, paging through thousands of keys; on every store.

use crate::gateway;

use airstate::store::{AssetKey, TaskScope, Writer};
use gateway::{enc, seg, ti_path, token_for, unique, Backend, Gateway, Reply, Ti};
use serde_json::{json, Value};
use uuid::Uuid;

on_every_store!(
    task_routes_set_get_patch_delete,
    task_clear_by_map_index_and_all_map_indices,
    listing_pages_through_thousands_of_keys_in_a_stable_order,
    asset_routes_by_name_and_uri,
    admin_and_task_credentials_never_cross,
    value_size_limit_applies_to_admin_writes_only,
    bad_input_is_refused_and_leaves_data_unharmed,
    admin_writes_are_announced_on_change_streams,
    assets_by_airflow_id_with_the_writer_airflow_records,
    bad_writers_are_refused_and_leave_data_unharmed,
    asset_ids_need_the_metastore_identity,
);

const ADMIN: &str = "admin-token-0123456789abcdef0123456789abcdef";

async fn start(backend: Backend) -> Gateway {
    Gateway::start_with(backend, &[("AIRSTATE_ADMIN_TOKEN", ADMIN)]).await
}

fn task_base(ti: &Ti) -> String {
    format!(
        "/admin/v1/dags/{}/dagRuns/{}/taskInstances/{}/state-store",
        seg(&ti.dag_id),
        seg(&ti.run_id),
        seg(&ti.task_id)
    )
}

fn task_key(ti: &Ti, key: &str, map_index: i32) -> String {
    format!("{}/{}?map_index={map_index}", task_base(ti), seg(key))
}

/// The task's scope as the gateway keys it (with its run's `dag_run.id` on a metastore).
async fn scope(gw: &Gateway, ti: &Ti, map_index: i64) -> TaskScope {
    let scope = TaskScope {
        dag_id: ti.dag_id.clone(),
        run_id: ti.run_id.clone(),
        task_id: ti.task_id.clone(),
        map_index,
        run_key: None,
    };
    airstate::identity::with_run_key(gw.state.identity.as_ref(), scope)
        .await
        .unwrap()
        .expect("the task's run exists")
}

async fn admin(gw: &Gateway, method: &str, path: &str, body: Option<&str>) -> Reply {
    let bearer = format!("Bearer {ADMIN}");
    let mut headers = vec![("authorization", bearer.as_str())];
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    gw.send_raw(method, path, &headers, body.unwrap_or(""))
        .await
}

async fn task_routes_set_get_patch_delete(backend: Backend) {
    let gw = start(backend).await;
    let ti = gw.task().await;
    let key = "spark/job id ü";
    let path = task_key(&ti, key, -1);

    let put = admin(
        &gw,
        "PUT",
        &path,
        Some(r#"{"value": {"n": 1180591620717411303424, "f": 1.0}, "expires_at": "2999-01-01T00:00:00Z"}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = admin(&gw, "GET", &path, None).await;
    assert_eq!(got.status, 200, "{got:?}");
    // The stored text comes back untouched, big integer and `1.0` included.
    assert!(
        got.text
            .starts_with(r#"{"value":{"n": 1180591620717411303424, "f": 1.0},"key":"#),
        "{got:?}"
    );
    assert_eq!(got.body["key"], key);
    assert_eq!(got.body["expires_at"], "2999-01-01T00:00:00.000Z");
    let updated = got.body["updated_at"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(updated).expect("updated_at is RFC 3339");

    // The task itself sees what the admin wrote, through the Execution API.
    let seen = gw.get(&ti_path(&ti, &seg(key)), &ti.token).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert!(seen.text.contains("1180591620717411303424"), "{seen:?}");

    // PATCH of the value alone keeps the expiry; of the expiry alone keeps the value.
    let patch = admin(&gw, "PATCH", &path, Some(r#"{"value": "second"}"#)).await;
    assert_eq!(patch.status, 204, "{patch:?}");
    let got = admin(&gw, "GET", &path, None).await;
    assert_eq!(got.body["value"], "second");
    assert_eq!(got.body["expires_at"], "2999-01-01T00:00:00.000Z");
    let patch = admin(&gw, "PATCH", &path, Some(r#"{"expires_at": null}"#)).await;
    assert_eq!(patch.status, 204, "{patch:?}");
    let got = admin(&gw, "GET", &path, None).await;
    assert_eq!(got.body["value"], "second");
    assert_eq!(got.body["expires_at"], Value::Null);

    // PATCH of a missing key creates nothing.
    let missing = task_key(&ti, "never", -1);
    let patch = admin(&gw, "PATCH", &missing, Some(r#"{"value": 1}"#)).await;
    assert_eq!(patch.status, 404, "{patch:?}");
    assert_eq!(
        patch.body["detail"]["message"],
        "Task state store key 'never' not found"
    );
    assert_eq!(admin(&gw, "GET", &missing, None).await.status, 404);

    // Another map index is another scope.
    let other = task_key(&ti, key, 3);
    assert_eq!(admin(&gw, "GET", &other, None).await.status, 404);

    let deleted = admin(&gw, "DELETE", &path, None).await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert_eq!(admin(&gw, "GET", &path, None).await.status, 404);
    // Idempotent, as Airflow's delete.
    assert_eq!(admin(&gw, "DELETE", &path, None).await.status, 204);
}

async fn task_clear_by_map_index_and_all_map_indices(backend: Backend) {
    let gw = start(backend).await;
    let ti = gw.task().await;
    for index in [-1, 0, 1, 2] {
        let put = admin(
            &gw,
            "PUT",
            &task_key(&ti, "k", index),
            Some(r#"{"value": 1}"#),
        )
        .await;
        assert_eq!(put.status, 204, "{put:?}");
    }
    let clear = admin(
        &gw,
        "DELETE",
        &format!("{}?map_index=1", task_base(&ti)),
        None,
    )
    .await;
    assert_eq!(clear.status, 204, "{clear:?}");
    assert_eq!(
        admin(&gw, "GET", &task_key(&ti, "k", 1), None).await.status,
        404
    );
    for index in [-1, 0, 2] {
        let got = admin(&gw, "GET", &task_key(&ti, "k", index), None).await;
        assert_eq!(got.status, 200, "map index {index} survives: {got:?}");
    }
    // No map_index means -1, as in Airflow.
    let clear = admin(&gw, "DELETE", &task_base(&ti), None).await;
    assert_eq!(clear.status, 204);
    assert_eq!(
        admin(&gw, "GET", &task_key(&ti, "k", -1), None)
            .await
            .status,
        404
    );
    assert_eq!(
        admin(&gw, "GET", &task_key(&ti, "k", 0), None).await.status,
        200
    );

    let all = format!("{}?all_map_indices=true", task_base(&ti));
    assert_eq!(admin(&gw, "DELETE", &all, None).await.status, 204);
    for index in [-1, 0, 1, 2] {
        let got = admin(&gw, "GET", &task_key(&ti, "k", index), None).await;
        assert_eq!(got.status, 404, "map index {index}: {got:?}");
    }
}

async fn listing_pages_through_thousands_of_keys_in_a_stable_order(backend: Backend) {
    use futures_util::StreamExt;
    let gw = start(backend).await;
    let ti = gw.task().await;
    let store = gw.state.store.clone();
    let own = scope(&gw, &ti, -1).await;
    const KEYS: usize = 2500;
    futures_util::stream::iter(0..KEYS)
        .for_each_concurrent(64, |i| {
            let store = store.clone();
            let own = own.clone();
            async move {
                store
                    .put_task(&own, &format!("key-{i:05}"), &i.to_string(), None)
                    .await
                    .unwrap();
            }
        })
        .await;
    // An expired key is never listed.
    store
        .put_task(&own, "key-expired", "0", Some(1000))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("{}?limit=1000", task_base(&ti));
        if let Some(after) = &after {
            path.push_str(&format!("&after={}", enc(after)));
        }
        let page = admin(&gw, "GET", &path, None).await;
        assert_eq!(page.status, 200, "{page:?}");
        // One more after the write between pages below.
        let total = if pages < 2 { KEYS } else { KEYS + 1 };
        assert_eq!(page.body["total_entries"], total, "{pages}");
        pages += 1;
        if pages == 2 {
            // A write between pages (before the cursor) neither shifts nor repeats what
            // follows, as an offset would.
            store.put_task(&own, "key-00000a", "1", None).await.unwrap();
        }
        for entry in page.body["entries"].as_array().unwrap() {
            let key = entry["key"].as_str().unwrap().to_owned();
            if key != "key-00000a" {
                let n: usize = key[4..].parse().unwrap();
                assert_eq!(entry["value"], json!(n));
            }
            seen.push(key);
        }
        match page.body["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..KEYS).map(|i| format!("key-{i:05}")).collect();
    assert_eq!(seen, expected, "every key once, in key order");

    let bad = admin(&gw, "GET", &format!("{}?limit=0", task_base(&ti)), None).await;
    assert_eq!(bad.status, 422, "{bad:?}");
    let bad = admin(&gw, "GET", &format!("{}?limit=1001", task_base(&ti)), None).await;
    assert_eq!(bad.status, 422, "{bad:?}");
}

async fn asset_routes_by_name_and_uri(backend: Backend) {
    let gw = start(backend).await;
    let name = format!("team/{}", unique("orders"));
    let uri = format!("s3://bucket/{}", unique("path"));
    let id = gw.pg.insert_asset(&name, &uri, true).await;
    let value = |by: &str, ident: &str, key: &str| {
        format!(
            "/admin/v1/assets/{by}/state-store/value?{}={}&key={}",
            if by == "by-name" { "name" } else { "uri" },
            enc(ident),
            enc(key)
        )
    };
    let put = admin(
        &gw,
        "PUT",
        &value("by-name", &name, "b"),
        Some(r#"{"value": [1, 2.0]}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let put = admin(
        &gw,
        "PUT",
        &value("by-uri", &uri, "a"),
        Some(r#"{"value": "x"}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    // Name and URI reach one asset; the writer is recorded as Airflow's `api` kind.
    let got = admin(&gw, "GET", &value("by-uri", &uri, "b"), None).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.text.starts_with(r#"{"value":[1, 2.0],"#), "{got:?}");
    assert_eq!(got.body["last_updated_by"], json!({"kind": "api"}));
    let writer = gw
        .state
        .store
        .asset_writer(&AssetKey(id.to_string()), "b")
        .await
        .unwrap();
    assert_eq!(writer, Some(Writer::Api));

    let list = admin(
        &gw,
        "GET",
        &format!("/admin/v1/assets/by-name/state-store?name={}", enc(&name)),
        None,
    )
    .await;
    assert_eq!(list.status, 200, "{list:?}");
    let keys: Vec<&str> = list.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(list.body["next_after"], Value::Null);

    assert_eq!(
        admin(&gw, "DELETE", &value("by-name", &name, "a"), None)
            .await
            .status,
        204
    );
    assert_eq!(
        admin(&gw, "GET", &value("by-name", &name, "a"), None)
            .await
            .status,
        404
    );
    let clear = format!("/admin/v1/assets/by-uri/state-store?uri={}", enc(&uri));
    assert_eq!(admin(&gw, "DELETE", &clear, None).await.status, 204);
    let gone = admin(&gw, "GET", &value("by-name", &name, "b"), None).await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.body["detail"]["message"],
        "Asset state store key 'b' not found"
    );

    let unknown = admin(&gw, "GET", &value("by-name", "no-such-asset", "b"), None).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert_eq!(
        unknown.body["detail"]["message"],
        "Asset with name='no-such-asset' not found"
    );
}

async fn admin_and_task_credentials_never_cross(backend: Backend) {
    let gw = start(backend).await;
    let ti = gw.task().await;
    let path = task_key(&ti, "k", -1);
    let put = gw
        .put(&ti_path(&ti, "k"), &ti.token, json!({"value": 1}))
        .await;
    assert_eq!(put.status, 204);

    // A task token, even the task's own, opens no admin route.
    let refused = gw.get(&path, &ti.token).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.body, json!({"detail": "Invalid auth token"}));
    let refused = gw.delete(&task_base(&ti), &ti.token).await;
    assert_eq!(refused.status, 403);
    let missing = gw.send("GET", &path, None, None).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(missing.body, json!({"detail": "Missing auth token"}));
    let wrong = gw.get(&path, &format!("{ADMIN}x")).await;
    assert_eq!(wrong.status, 403);

    // The admin token opens no task route.
    let refused = gw.get(&ti_path(&ti, "k"), ADMIN).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.body, json!({"detail": "Invalid auth token"}));
    let refused = gw
        .delete(&format!("/execution/store/ti/{}", ti.id), ADMIN)
        .await;
    assert_eq!(refused.status, 403);
    // Nothing refused touched the data.
    assert_eq!(
        gw.get(&ti_path(&ti, "k"), &ti.token).await.body,
        json!({"value": 1})
    );

    // Without an admin token configured, the admin API does not exist.
    let off = Gateway::start(backend).await;
    let reply = off.get(&path, ADMIN).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert_eq!(reply.body, json!({"detail": "Not Found"}));
    let _ = token_for(Uuid::nil());
}

async fn value_size_limit_applies_to_admin_writes_only(backend: Backend) {
    let gw = start(backend).await;
    let ti = gw.task().await;
    let path = task_key(&ti, "big", -1);
    let at_limit = format!(r#"{{"value": "{}"}}"#, "a".repeat(65533));
    let over = format!(r#"{{"value": "{}"}}"#, "a".repeat(65534));
    assert_eq!(admin(&gw, "PUT", &path, Some(&at_limit)).await.status, 204);
    let refused = admin(&gw, "PUT", &path, Some(&over)).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert_eq!(refused.body["detail"][0]["loc"], json!(["body", "value"]));
    assert!(
        refused.text.contains("max_value_storage_bytes"),
        "{refused:?}"
    );
    let refused = admin(&gw, "PATCH", &path, Some(&over)).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    // The value already there is unharmed.
    let kept = admin(&gw, "GET", &path, None).await;
    assert_eq!(kept.body["value"].as_str().unwrap().len(), 65533);

    // A caller storing for Airflow's Execution API (the Airflow state backend) skips the
    // limit, as that API does; a malformed flag is refused and stores nothing.
    let refused = admin(
        &gw,
        "PUT",
        &format!("{path}&skip_value_limit=maybe"),
        Some(&over),
    )
    .await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert_eq!(
        refused.body["detail"][0]["loc"],
        json!(["query", "skip_value_limit"])
    );
    let kept = admin(&gw, "GET", &path, None).await;
    assert_eq!(kept.body["value"].as_str().unwrap().len(), 65533);
    let put = admin(
        &gw,
        "PUT",
        &format!("{path}&skip_value_limit=true"),
        Some(&over),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let stored = admin(&gw, "GET", &path, None).await;
    assert_eq!(stored.body["value"].as_str().unwrap().len(), 65534);
    let id = gw
        .pg
        .insert_asset(&unique("big"), &unique("s3://big/"), true)
        .await;
    let refused = admin(&gw, "PUT", &by_id(id, Some("k")), Some(&over)).await;
    assert_eq!(refused.status, 422, "{refused:?}");
    let put = admin(
        &gw,
        "PUT",
        &format!("{}?skip_value_limit=true", by_id(id, Some("k"))),
        Some(&over),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");

    // The Execution API only warns in Airflow: it stores the same value.
    let put = gw.put_text(&ti_path(&ti, "big"), &ti.token, &over).await;
    assert_eq!(put.status, 204, "{put:?}");

    // Over the hard body cap, every route answers 413.
    let capped = Gateway::start_with(
        backend,
        &[
            ("AIRSTATE_ADMIN_TOKEN", ADMIN),
            ("AIRSTATE_MAX_BODY_BYTES", "1000"),
            ("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES", "0"),
        ],
    )
    .await;
    let ti = capped.task().await;
    let big = format!(r#"{{"value": "{}"}}"#, "a".repeat(2000));
    let refused = admin(&capped, "PUT", &task_key(&ti, "k", -1), Some(&big)).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    // With max_value_storage_bytes=0 there is no value limit below the body cap.
    let fits = format!(r#"{{"value": "{}"}}"#, "a".repeat(900));
    let put = admin(&capped, "PUT", &task_key(&ti, "k", -1), Some(&fits)).await;
    assert_eq!(put.status, 204, "{put:?}");
}

async fn bad_input_is_refused_and_leaves_data_unharmed(backend: Backend) {
    let gw = start(backend).await;
    let ti = gw.task().await;
    let path = task_key(&ti, "k", -1);
    assert_eq!(
        admin(&gw, "PUT", &path, Some(r#"{"value": "original"}"#))
            .await
            .status,
        204
    );
    for (method, target, body) in [
        ("PUT", path.clone(), Some(r#"{"value": null}"#)),
        ("PUT", path.clone(), Some(r#"{"value": 1, "extra": 2}"#)),
        (
            "PUT",
            path.clone(),
            Some(r#"{"value": 1, "expires_at": "2030-01-01T00:00:00"}"#),
        ),
        ("PUT", path.clone(), Some("not json")),
        ("PATCH", path.clone(), Some("{}")),
        ("PATCH", path.clone(), Some(r#"{"value": null}"#)),
        ("PUT", task_key(&ti, "k", -2), Some(r#"{"value": 1}"#)),
        ("GET", format!("{}?map_index=x", task_base(&ti)), None),
        (
            "DELETE",
            format!("{}?all_map_indices=maybe", task_base(&ti)),
            None,
        ),
        ("DELETE", format!("{}?map_index=x", task_base(&ti)), None),
        (
            "PUT",
            format!("{}/{}", task_base(&ti), "k".repeat(513)),
            Some(r#"{"value": 1}"#),
        ),
    ] {
        let reply = admin(&gw, method, &target, body).await;
        assert_eq!(reply.status, 422, "{method} {target} {body:?}: {reply:?}");
        assert!(reply.body["detail"].is_array(), "{reply:?}");
    }
    let kept = admin(&gw, "GET", &path, None).await;
    assert_eq!(kept.body["value"], "original");
    assert_eq!(kept.body["expires_at"], Value::Null);
}

async fn next_change(
    watch: &mut airstate::store::events::Watch,
) -> airstate::store::events::Change {
    use airstate::store::events::Delivery;
    loop {
        let delivery =
            tokio::time::timeout(std::time::Duration::from_secs(5), watch.deliveries.recv())
                .await
                .expect("a change event within 5 s")
                .expect("an open channel");
        if let Delivery::Event(event) = delivery {
            if event.concerns(watch.map_index) {
                return event.change.clone();
            }
        }
    }
}

/// Admin writes go through the store's own operations: watchers hear them, and a PATCH
/// gives the key a new version (ETag) as any write does.
async fn admin_writes_are_announced_on_change_streams(backend: Backend) {
    use airstate::store::events::Change;
    let gw = start(backend).await;
    let ti = gw.task().await;
    let own = scope(&gw, &ti, -1).await;
    let mut watch = gw.state.store.watch_task(&own).await.unwrap();
    let path = task_key(&ti, "k", -1);
    assert_eq!(
        admin(&gw, "PUT", &path, Some(r#"{"value": 1.0}"#))
            .await
            .status,
        204
    );
    let Change::Set { key, json, version } = next_change(&mut watch).await else {
        panic!("expected a set");
    };
    assert_eq!((key.as_str(), json.as_str()), ("k", "1.0"));
    assert_eq!(
        admin(&gw, "PATCH", &path, Some(r#"{"value": 2}"#))
            .await
            .status,
        204
    );
    let Change::Set {
        version: patched, ..
    } = next_change(&mut watch).await
    else {
        panic!("expected a set");
    };
    assert_ne!(
        patched, version,
        "a PATCH is a write with a version of its own"
    );
    assert_eq!(admin(&gw, "DELETE", &path, None).await.status, 204);
    assert_eq!(
        next_change(&mut watch).await,
        Change::Delete { key: "k".into() }
    );
    assert_eq!(
        admin(&gw, "DELETE", &task_base(&ti), None).await.status,
        204
    );
    assert_eq!(next_change(&mut watch).await, Change::Clear);
}

fn by_id(id: impl std::fmt::Display, key: Option<&str>) -> String {
    match key {
        Some(key) => format!("/admin/v1/assets/by-id/{id}/state-store/{}", seg(key)),
        None => format!("/admin/v1/assets/by-id/{id}/state-store"),
    }
}

/// What `airstate_airflow.AirstateBackend` relies on: Airflow hands its backend the
/// integer asset id and, for a write, who wrote it; the id reaches the same asset as its
/// name and URI on the Execution API, and the writer reads back as Airflow records it.
async fn assets_by_airflow_id_with_the_writer_airflow_records(backend: Backend) {
    let gw = start(backend).await;
    let name = unique("by-id");
    let uri = format!("s3://bucket/{}", unique("by-id"));
    let id = gw.pg.insert_asset(&name, &uri, true).await;
    let task_writer = json!({
        "kind": "task", "dag_id": "etl", "run_id": "manual__1", "task_id": "load", "map_index": 3
    });
    let put = admin(
        &gw,
        "PUT",
        &by_id(id, Some("wm/a b")),
        Some(&format!(
            r#"{{"last_updated_by": {task_writer}, "value": {{"n": 1180591620717411303424, "f": 1.0}}}}"#
        )),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = admin(&gw, "GET", &by_id(id, Some("wm/a b")), None).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(
        got.text
            .starts_with(r#"{"value":{"n": 1180591620717411303424, "f": 1.0},"key":"wm/a b""#),
        "{got:?}"
    );
    assert_eq!(got.body["last_updated_by"], task_writer);
    assert_eq!(
        gw.state
            .store
            .asset_writer(&AssetKey(id.to_string()), "wm/a b")
            .await
            .unwrap(),
        Some(Writer::Task {
            dag_id: "etl".into(),
            run_id: "manual__1".into(),
            task_id: "load".into(),
            map_index: 3
        })
    );
    // The same asset as by name (admin API) and by URI (a task, on the Execution API).
    let by_name = admin(
        &gw,
        "GET",
        &format!(
            "/admin/v1/assets/by-name/state-store/value?name={}&key={}",
            enc(&name),
            enc("wm/a b")
        ),
        None,
    )
    .await;
    assert_eq!(by_name.body["last_updated_by"], task_writer, "{by_name:?}");
    let ti = gw.task().await;
    let seen = gw
        .get(
            &format!(
                "/execution/store/asset/by-uri/value?uri={}&key={}",
                enc(&uri),
                enc("wm/a b")
            ),
            &ti.token,
        )
        .await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert!(seen.text.contains("1180591620717411303424"), "{seen:?}");

    // A watcher's write, then an operator's (no writer given: Airflow's `api` kind), also
    // through the by-name route.
    let put = admin(
        &gw,
        "PUT",
        &by_id(id, Some("w")),
        Some(r#"{"value": 1, "last_updated_by": {"kind": "watcher"}}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = admin(&gw, "GET", &by_id(id, Some("w")), None).await;
    assert_eq!(got.body["last_updated_by"], json!({"kind": "watcher"}));
    let put = admin(&gw, "PUT", &by_id(id, Some("w")), Some(r#"{"value": 2}"#)).await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = admin(&gw, "GET", &by_id(id, Some("w")), None).await;
    assert_eq!(got.body["value"], 2);
    assert_eq!(got.body["last_updated_by"], json!({"kind": "api"}));
    let put = admin(
        &gw,
        "PUT",
        &format!(
            "/admin/v1/assets/by-name/state-store/value?name={}&key=w",
            enc(&name)
        ),
        Some(r#"{"value": 3, "last_updated_by": {"kind": "watcher"}}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = admin(&gw, "GET", &by_id(id, Some("w")), None).await;
    assert_eq!(
        (
            got.body["value"].clone(),
            got.body["last_updated_by"].clone()
        ),
        (json!(3), json!({"kind": "watcher"}))
    );

    let list = admin(&gw, "GET", &format!("{}?limit=1", by_id(id, None)), None).await;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.body["total_entries"], 2);
    assert_eq!(list.body["entries"][0]["key"], "w");
    assert_eq!(list.body["next_after"], "w");
    let rest = admin(&gw, "GET", &format!("{}?after=w", by_id(id, None)), None).await;
    assert_eq!(rest.body["entries"][0]["key"], "wm/a b", "{rest:?}");

    assert_eq!(
        admin(&gw, "DELETE", &by_id(id, Some("w")), None)
            .await
            .status,
        204
    );
    assert_eq!(
        admin(&gw, "GET", &by_id(id, Some("w")), None).await.status,
        404
    );
    assert_eq!(
        admin(&gw, "DELETE", &by_id(id, None), None).await.status,
        204
    );
    let gone = admin(&gw, "GET", &by_id(id, Some("wm/a b")), None).await;
    assert_eq!(gone.status, 404, "{gone:?}");
    assert_eq!(
        gone.body["detail"]["message"],
        "Asset state store key 'wm/a b' not found"
    );

    // An id is any row of `asset`, active or not, as in Airflow's Core REST API.
    let inactive = gw
        .pg
        .insert_asset(&unique("gone"), &unique("s3://gone/"), false)
        .await;
    let put = admin(
        &gw,
        "PUT",
        &by_id(inactive, Some("k")),
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    assert_eq!(
        admin(&gw, "GET", &by_id(inactive, Some("k")), None)
            .await
            .body["value"],
        1
    );
    for missing in [i64::from(i32::MAX), 1 << 40, -5] {
        let reply = admin(&gw, "GET", &by_id(missing, Some("k")), None).await;
        assert_eq!(reply.status, 404, "{missing}: {reply:?}");
        assert_eq!(
            reply.body["detail"],
            json!({"reason": "not_found", "message": format!("Asset with id {missing} not found")})
        );
    }
    let put = admin(
        &gw,
        "PUT",
        &by_id(i32::MAX, Some("k")),
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(put.status, 404, "{put:?}");

    // The admin credential alone opens these routes.
    let refused = gw.get(&by_id(id, Some("k")), &ti.token).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let missing = gw.send("GET", &by_id(id, None), None, None).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    let off = Gateway::start(backend).await;
    assert_eq!(off.get(&by_id(id, None), ADMIN).await.status, 404);
}

async fn bad_writers_are_refused_and_leave_data_unharmed(backend: Backend) {
    let gw = start(backend).await;
    let id = gw
        .pg
        .insert_asset(&unique("w"), &unique("s3://w/"), true)
        .await;
    let path = by_id(id, Some("k"));
    let put = admin(
        &gw,
        "PUT",
        &path,
        Some(r#"{"value": "original", "last_updated_by": {"kind": "watcher"}}"#),
    )
    .await;
    assert_eq!(put.status, 204, "{put:?}");
    for (body, loc) in [
        (
            r#"{"value": 1, "last_updated_by": {"kind": "robot"}}"#,
            json!(["body", "last_updated_by", "kind"]),
        ),
        (
            r#"{"value": 1, "last_updated_by": {}}"#,
            json!(["body", "last_updated_by", "kind"]),
        ),
        (
            r#"{"value": 1, "last_updated_by": "api"}"#,
            json!(["body", "last_updated_by"]),
        ),
        // Airflow's rule: a task writer names its task instance in full...
        (
            r#"{"value": 1, "last_updated_by": {"kind": "task", "dag_id": "d", "run_id": "r", "task_id": "t"}}"#,
            json!(["body", "last_updated_by", "map_index"]),
        ),
        (
            r#"{"value": 1, "last_updated_by": {"kind": "task", "dag_id": "", "run_id": "r", "task_id": "t", "map_index": 0}}"#,
            json!(["body", "last_updated_by", "dag_id"]),
        ),
        (
            r#"{"value": 1, "last_updated_by": {"kind": "task", "dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -2}}"#,
            json!(["body", "last_updated_by", "map_index"]),
        ),
        // ...and a watcher or an operator names none.
        (
            r#"{"value": 1, "last_updated_by": {"kind": "watcher", "dag_id": "d"}}"#,
            json!(["body", "last_updated_by", "dag_id"]),
        ),
        (
            r#"{"value": 1, "last_updated_by": {"kind": "api", "extra": 1}}"#,
            json!(["body", "last_updated_by", "extra"]),
        ),
        // The value's own rules still hold.
        (
            r#"{"value": null, "last_updated_by": {"kind": "api"}}"#,
            json!(["body", "value"]),
        ),
        (
            r#"{"last_updated_by": {"kind": "api"}}"#,
            json!(["body", "value"]),
        ),
        (
            r#"{"value": 1, "expires_at": 5, "last_updated_by": {"kind": "api"}}"#,
            json!(["body", "expires_at"]),
        ),
    ] {
        let reply = admin(&gw, "PUT", &path, Some(body)).await;
        assert_eq!(reply.status, 422, "{body}: {reply:?}");
        assert_eq!(reply.body["detail"][0]["loc"], loc, "{body}: {reply:?}");
    }
    let reply = admin(&gw, "PUT", &by_id("x", Some("k")), Some(r#"{"value": 1}"#)).await;
    assert_eq!(reply.status, 422, "{reply:?}");
    assert_eq!(reply.body["detail"][0]["loc"], json!(["path", "asset_id"]));
    let reply = admin(&gw, "GET", &format!("{}?limit=0", by_id(id, None)), None).await;
    assert_eq!(reply.status, 422, "{reply:?}");
    let reply = admin(
        &gw,
        "PUT",
        &by_id(id, Some(&"k".repeat(513))),
        Some(r#"{"value": 1}"#),
    )
    .await;
    assert_eq!(reply.status, 422, "{reply:?}");
    let kept = admin(&gw, "GET", &path, None).await;
    assert_eq!(kept.body["value"], "original");
    assert_eq!(kept.body["last_updated_by"], json!({"kind": "watcher"}));
}

async fn asset_ids_need_the_metastore_identity(backend: Backend) {
    let gw = Gateway::start_with(
        backend,
        &[
            ("AIRSTATE_ADMIN_TOKEN", ADMIN),
            ("AIRSTATE_IDENTITY", "claims"),
        ],
    )
    .await;
    for (method, path, body) in [
        ("GET", by_id(1, Some("k")), None),
        ("PUT", by_id(1, Some("k")), Some(r#"{"value": 1}"#)),
        ("DELETE", by_id(1, Some("k")), None),
        ("GET", by_id(1, None), None),
        ("DELETE", by_id(1, None), None),
    ] {
        let reply = admin(&gw, method, &path, body).await;
        assert_eq!(reply.status, 400, "{method} {path}: {reply:?}");
        assert_eq!(reply.body["detail"]["reason"], "asset_ids_need_metastore");
        assert!(
            reply.body["detail"]["message"]
                .as_str()
                .unwrap()
                .contains("AIRSTATE_IDENTITY=metastore"),
            "{reply:?}"
        );
    }
    // The credential is still checked first.
    let reply = gw.send("GET", &by_id(1, None), None, None).await;
    assert_eq!(reply.status, 401, "{reply:?}");
}
