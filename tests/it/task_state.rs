//! Task-state routes of both API generations, every behaviour run against the embedded
//! store and a real Redis.

use crate::gateway;

use std::time::Duration;

use gateway::{ti_path, token_for, unique, Backend, Gateway};
use serde_json::json;
use uuid::Uuid;

on_every_store!(
    every_json_type_round_trips_as_sent,
    keys_may_hold_slashes_and_unicode,
    missing_key_is_airflows_404,
    delete_is_idempotent_and_targets_one_key,
    store_clear_touches_only_own_map_index,
    aip103_clear_all_map_indices_is_opt_in,
    both_generations_share_state,
    retry_sees_earlier_state_and_retired_attempt_is_refused,
    unknown_task_instance_is_404,
    bad_bodies_are_422_and_leave_data_unharmed,
    expired_keys_are_never_served,
    put_without_expiry_makes_a_key_permanent,
    keys_over_512_characters_are_refused,
    put_overwrites,
    oversized_body_is_413,
);

async fn every_json_type_round_trips_as_sent(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let values = [
        r#""spark_001""#,
        r#""""#,
        r#""unicode ü €""#,
        "0",
        "-17",
        "1.0",
        "2.5e-7",
        "1180591620717411303424",
        "123456789012345678901234567890.123456789",
        "true",
        "false",
        "[]",
        "{}",
        r#"[1, "two", [3.0], {"four": null}]"#,
        r#"{"z": 1, "a": {"nested": [true, false]}, "m": "x"}"#,
    ];
    for (i, value) in values.iter().enumerate() {
        let key = format!("k{i}");
        let put = gw
            .put_text(
                &ti_path(&ti, &key),
                &ti.token,
                &format!(r#"{{"value": {value}}}"#),
            )
            .await;
        assert_eq!(put.status, 204, "{value}: {put:?}");
        assert_eq!(put.text, "");
        let got = gw.get(&ti_path(&ti, &key), &ti.token).await;
        assert_eq!(got.status, 200, "{value}: {got:?}");
        // The exact text comes back: digits, `1.0` and member order intact.
        assert_eq!(got.text, format!(r#"{{"value":{value}}}"#));
        assert_eq!(got.header("content-type"), Some("application/json"));
    }
}

async fn keys_may_hold_slashes_and_unicode(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let put = gw
        .put(
            &ti_path(&ti, "spark%2Fjob_id"),
            &ti.token,
            json!({"value": "a"}),
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");
    // `%2F` and `/` name the same key.
    let got = gw.get(&ti_path(&ti, "spark/job_id"), &ti.token).await;
    assert_eq!(got.body, json!({"value": "a"}));
    let deep = gw
        .put(&ti_path(&ti, "a/b/c"), &ti.token, json!({"value": 3}))
        .await;
    assert_eq!(deep.status, 204);
    assert_eq!(
        gw.get(&ti_path(&ti, "a%2Fb%2Fc"), &ti.token).await.body,
        json!({"value": 3})
    );
    let unicode = "sch%C3%BCssel%20mit%20leer";
    assert_eq!(
        gw.put(&ti_path(&ti, unicode), &ti.token, json!({"value": [1]}))
            .await
            .status,
        204
    );
    let missing = gw.get(&ti_path(&ti, "schl%C3%BCssel"), &ti.token).await;
    assert_eq!(missing.status, 404);
    // A key whose percent-escapes are not UTF-8 names no key: refused, nothing stored.
    let broken = gw
        .put(&ti_path(&ti, "bad%FFkey"), &ti.token, json!({"value": 1}))
        .await;
    assert_eq!(broken.status, 422, "{broken:?}");
    assert_eq!(broken.body["detail"][0]["type"], json!("string_type"));
    assert_eq!(
        broken.body["detail"][0]["msg"],
        json!("Invalid URL: Invalid UTF-8 in `key`")
    );
    assert_eq!(
        gw.get(&ti_path(&ti, unicode), &ti.token).await.body,
        json!({"value": [1]})
    );
    // Deleting through the other spelling removes it.
    assert_eq!(
        gw.delete(&ti_path(&ti, "spark/job_id"), &ti.token)
            .await
            .status,
        204
    );
    assert_eq!(
        gw.get(&ti_path(&ti, "spark%2Fjob_id"), &ti.token)
            .await
            .status,
        404
    );
}

async fn missing_key_is_airflows_404(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let got = gw.get(&ti_path(&ti, "never"), &ti.token).await;
    assert_eq!(got.status, 404);
    assert_eq!(
        got.body,
        json!({"detail": {"reason": "not_found", "message": "Task state store key 'never' not found"}})
    );
    let quoted = gw.get(&ti_path(&ti, "it's"), &ti.token).await;
    assert_eq!(
        quoted.body["detail"]["message"],
        json!("Task state store key \"it's\" not found")
    );
}

async fn delete_is_idempotent_and_targets_one_key(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    for key in ["a", "b"] {
        gw.put(&ti_path(&ti, key), &ti.token, json!({"value": key}))
            .await;
    }
    for _ in 0..2 {
        let deleted = gw.delete(&ti_path(&ti, "a"), &ti.token).await;
        assert_eq!(deleted.status, 204);
        assert_eq!(deleted.text, "");
    }
    assert_eq!(
        gw.delete(&ti_path(&ti, "never-set"), &ti.token)
            .await
            .status,
        204
    );
    assert_eq!(gw.get(&ti_path(&ti, "a"), &ti.token).await.status, 404);
    assert_eq!(
        gw.get(&ti_path(&ti, "b"), &ti.token).await.body,
        json!({"value": "b"})
    );
}

/// Three map indices of one task; returns them in map-index order.
async fn mapped_task(gw: &Gateway) -> Vec<gateway::Ti> {
    let (dag, run) = (unique("dag"), unique("run"));
    let mut tis = Vec::new();
    for index in 0..3 {
        let ti = gw.task_at(&dag, &run, "mapped", index).await;
        let put = gw
            .put(&ti_path(&ti, "k"), &ti.token, json!({"value": index}))
            .await;
        assert_eq!(put.status, 204);
        gw.put(&ti_path(&ti, "other"), &ti.token, json!({"value": "x"}))
            .await;
        tis.push(ti);
    }
    tis
}

async fn store_clear_touches_only_own_map_index(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let tis = mapped_task(&gw).await;
    // Airflow 3.3 ignores all_map_indices on this route.
    let path = format!("/execution/store/ti/{}?all_map_indices=true", tis[2].id);
    let cleared = gw.delete(&path, &tis[2].token).await;
    assert_eq!(cleared.status, 204, "{cleared:?}");
    assert_eq!(
        gw.get(&ti_path(&tis[2], "k"), &tis[2].token).await.status,
        404
    );
    assert_eq!(
        gw.get(&ti_path(&tis[2], "other"), &tis[2].token)
            .await
            .status,
        404
    );
    for (index, ti) in tis.iter().enumerate().take(2) {
        let got = gw.get(&ti_path(ti, "k"), &ti.token).await;
        assert_eq!(got.body, json!({"value": index}), "map index {index}");
    }
    // Clearing an empty scope is fine too.
    assert_eq!(gw.delete(&path, &tis[2].token).await.status, 204);
}

async fn aip103_clear_all_map_indices_is_opt_in(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let tis = mapped_task(&gw).await;
    let own = format!("/execution/state/ti/{}", tis[0].id);
    assert_eq!(gw.delete(&own, &tis[0].token).await.status, 204);
    assert_eq!(
        gw.get(&ti_path(&tis[0], "k"), &tis[0].token).await.status,
        404
    );
    assert_eq!(
        gw.get(&ti_path(&tis[1], "k"), &tis[1].token).await.body,
        json!({"value": 1})
    );

    let bad = gw
        .delete(&format!("{own}?all_map_indices=perhaps"), &tis[0].token)
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(
        bad.body["detail"][0]["loc"],
        json!(["query", "all_map_indices"])
    );
    assert_eq!(
        gw.get(&ti_path(&tis[1], "k"), &tis[1].token).await.status,
        200
    );

    let all = gw
        .delete(&format!("{own}?all_map_indices=true"), &tis[0].token)
        .await;
    assert_eq!(all.status, 204);
    for ti in &tis {
        for key in ["k", "other"] {
            assert_eq!(gw.get(&ti_path(ti, key), &ti.token).await.status, 404);
        }
    }
    // The task's state can be written again afterwards.
    assert_eq!(
        gw.put(&ti_path(&tis[1], "k"), &tis[1].token, json!({"value": 9}))
            .await
            .status,
        204
    );
    assert_eq!(
        gw.get(&ti_path(&tis[1], "k"), &tis[1].token).await.body,
        json!({"value": 9})
    );
}

async fn both_generations_share_state(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let seed = |key: &str| format!("/execution/state/ti/{}/{key}", ti.id);
    assert_eq!(
        gw.put(&seed("a/b"), &ti.token, json!({"value": {"x": 1}}))
            .await
            .status,
        204
    );
    assert_eq!(
        gw.get(&ti_path(&ti, "a%2Fb"), &ti.token).await.body,
        json!({"value": {"x": 1}})
    );
    assert_eq!(gw.delete(&ti_path(&ti, "a/b"), &ti.token).await.status, 204);
    let gone = gw.get(&seed("a/b"), &ti.token).await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.body["detail"]["message"],
        json!("Task state store key 'a/b' not found")
    );
    let empty = gw
        .get(&format!("/execution/state/ti/{}/", ti.id), &ti.token)
        .await;
    assert_eq!(empty.status, 422);
}

async fn retry_sees_earlier_state_and_retired_attempt_is_refused(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let first = gw.task().await;
    gw.put(
        &ti_path(&first, "remote_job_id"),
        &first.token,
        json!({"value": "job-42"}),
    )
    .await;
    // Airflow retries by moving the row to a new UUID with the same scope.
    gw.pg.delete_task_instance(first.id).await;
    let second = gw
        .task_at(
            &first.dag_id,
            &first.run_id,
            &first.task_id,
            first.map_index,
        )
        .await;
    let got = gw
        .get(&ti_path(&second, "remote_job_id"), &second.token)
        .await;
    assert_eq!(got.body, json!({"value": "job-42"}));
    // Past the identity cache's freshness window the old attempt no longer resolves.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = gw
        .put(
            &ti_path(&first, "remote_job_id"),
            &first.token,
            json!({"value": "late"}),
        )
        .await;
    assert_eq!(stale.status, 404, "{stale:?}");
    assert_eq!(
        stale.body["detail"]["message"],
        json!(format!("Task instance {} not found", first.id))
    );
    assert_eq!(
        gw.get(&ti_path(&second, "remote_job_id"), &second.token)
            .await
            .body,
        json!({"value": "job-42"})
    );
}

async fn unknown_task_instance_is_404(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ghost = Uuid::new_v4();
    let token = token_for(ghost);
    let path = format!("/execution/store/ti/{ghost}/k");
    let expected = json!({"detail": {"reason": "not_found", "message": format!("Task instance {ghost} not found")}});
    for reply in [
        gw.get(&path, &token).await,
        gw.put(&path, &token, json!({"value": 1})).await,
        gw.delete(&path, &token).await,
        gw.delete(&format!("/execution/store/ti/{ghost}"), &token)
            .await,
    ] {
        assert_eq!(reply.status, 404);
        assert_eq!(reply.body, expected);
    }
}

async fn bad_bodies_are_422_and_leave_data_unharmed(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "precious");
    gw.put(&path, &ti.token, json!({"value": {"keep": "me"}}))
        .await;
    let bearer = format!("Bearer {}", ti.token);
    const JSON: Option<&str> = Some("application/json");
    // (case, content type, body, first error type, its loc)
    let cases = [
        (
            "empty object",
            JSON,
            "{}",
            "missing",
            json!(["body", "value"]),
        ),
        (
            "null value",
            JSON,
            r#"{"value": null}"#,
            "value_error",
            json!(["body", "value"]),
        ),
        (
            "extra field",
            JSON,
            r#"{"value": 1, "x": 2}"#,
            "extra_forbidden",
            json!(["body", "x"]),
        ),
        (
            "nested overflow",
            JSON,
            r#"{"value": [1, {"a": 1e400}]}"#,
            "value_error",
            json!(["body", "value"]),
        ),
        (
            "NaN token",
            JSON,
            r#"{"value": NaN}"#,
            // Python's json reads NaN; the value rule refuses it.
            "value_error",
            json!(["body", "value"]),
        ),
        (
            "nested Infinity",
            JSON,
            r#"{"value": [Infinity]}"#,
            "value_error",
            json!(["body", "value"]),
        ),
        (
            "broken json",
            JSON,
            r#"{"value": "#,
            "json_invalid",
            json!(["body", 10]),
        ),
        (
            "text/plain",
            Some("text/plain"),
            r#"{"value": 1}"#,
            "model_attributes_type",
            json!(["body"]),
        ),
        (
            "no content type",
            None,
            r#"{"value": 1}"#,
            "model_attributes_type",
            json!(["body"]),
        ),
        (
            "array body",
            JSON,
            "[1]",
            "model_attributes_type",
            json!(["body"]),
        ),
        (
            "naive expires_at",
            JSON,
            r#"{"value": 1, "expires_at": "2030-01-01T00:00:00"}"#,
            "timezone_aware",
            json!(["body", "expires_at"]),
        ),
        (
            "unparseable expires_at",
            JSON,
            r#"{"value": 1, "expires_at": "tomorrow"}"#,
            "datetime_from_date_parsing",
            json!(["body", "expires_at"]),
        ),
        ("empty body", JSON, "", "missing", json!(["body"])),
    ];
    for (name, content_type, body, kind, loc) in cases {
        let mut headers = vec![("authorization", bearer.as_str())];
        if let Some(content_type) = content_type {
            headers.push(("content-type", content_type));
        }
        let reply = gw.send_raw("PUT", &path, &headers, body).await;
        assert_eq!(reply.status, 422, "{name}: {reply:?}");
        let first = &reply.body["detail"][0];
        assert_eq!(first["type"], json!(kind), "{name}: {reply:?}");
        assert_eq!(first["loc"], loc, "{name}: {reply:?}");
        assert!(first["msg"].is_string(), "{name}");
    }
    let got = gw.get(&path, &ti.token).await;
    assert_eq!(got.body, json!({"value": {"keep": "me"}}));
}

fn iso_in(seconds: f64) -> String {
    let at = chrono::Utc::now() + chrono::Duration::milliseconds((seconds * 1000.0) as i64);
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn expired_keys_are_never_served(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let soon = iso_in(1.0);
    let epoch_soon = (chrono::Utc::now().timestamp_millis() + 1000) as f64 / 1000.0;
    let later = iso_in(3600.0);
    gw.put(
        &ti_path(&ti, "iso"),
        &ti.token,
        json!({"value": 1, "expires_at": soon}),
    )
    .await;
    gw.put(
        &ti_path(&ti, "epoch"),
        &ti.token,
        json!({"value": 2, "expires_at": epoch_soon}),
    )
    .await;
    gw.put(
        &ti_path(&ti, "later"),
        &ti.token,
        json!({"value": 3, "expires_at": later}),
    )
    .await;
    gw.put(
        &ti_path(&ti, "past"),
        &ti.token,
        json!({"value": 4, "expires_at": iso_in(-5.0)}),
    )
    .await;
    assert_eq!(gw.get(&ti_path(&ti, "iso"), &ti.token).await.status, 200);
    assert_eq!(gw.get(&ti_path(&ti, "epoch"), &ti.token).await.status, 200);
    assert_eq!(gw.get(&ti_path(&ti, "past"), &ti.token).await.status, 404);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..2 {
        assert_eq!(gw.get(&ti_path(&ti, "iso"), &ti.token).await.status, 404);
        assert_eq!(gw.get(&ti_path(&ti, "epoch"), &ti.token).await.status, 404);
    }
    assert_eq!(
        gw.get(&ti_path(&ti, "later"), &ti.token).await.body,
        json!({"value": 3})
    );
}

async fn put_without_expiry_makes_a_key_permanent(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    gw.put(
        &path,
        &ti.token,
        json!({"value": "old", "expires_at": iso_in(1.0)}),
    )
    .await;
    let put = gw.put(&path, &ti.token, json!({"value": "new"})).await;
    assert_eq!(put.status, 204);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(gw.get(&path, &ti.token).await.body, json!({"value": "new"}));
}

async fn keys_over_512_characters_are_refused(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let longest = "k".repeat(512);
    assert_eq!(
        gw.put(&ti_path(&ti, &longest), &ti.token, json!({"value": 1}))
            .await
            .status,
        204
    );
    let too_long = "k".repeat(513);
    let refused = gw
        .put(&ti_path(&ti, &too_long), &ti.token, json!({"value": 1}))
        .await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.body["detail"][0]["type"], json!("string_too_long"));
    assert_eq!(refused.body["detail"][0]["loc"], json!(["path", "key"]));
    assert_eq!(
        gw.get(&ti_path(&ti, &too_long), &ti.token).await.status,
        422
    );
    assert_eq!(gw.get(&ti_path(&ti, &longest), &ti.token).await.status, 200);
    let empty = gw
        .delete(&format!("/execution/store/ti/{}/", ti.id), &ti.token)
        .await;
    assert_eq!(empty.status, 422, "{empty:?}");
    assert_eq!(empty.body["detail"][0]["type"], json!("string_too_short"));
    // A trailing-slash DELETE is not a clear.
    assert_eq!(gw.get(&ti_path(&ti, &longest), &ti.token).await.status, 200);
}

async fn put_overwrites(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    gw.put(&path, &ti.token, json!({"value": [1, 2]})).await;
    gw.put(&path, &ti.token, json!({"value": "second"})).await;
    assert_eq!(
        gw.get(&path, &ti.token).await.body,
        json!({"value": "second"})
    );
}

async fn oversized_body_is_413(backend: Backend) {
    let gw = Gateway::start_with(backend, &[("AIRSTATE_MAX_BODY_BYTES", "1024")]).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "big");
    let small = gw
        .put(&path, &ti.token, json!({"value": "x".repeat(900)}))
        .await;
    assert_eq!(small.status, 204);
    let big = gw
        .put(&path, &ti.token, json!({"value": "y".repeat(2000)}))
        .await;
    assert_eq!(big.status, 413, "{big:?}");
    assert!(big.body["detail"].as_str().unwrap().contains("1024"));
    assert_eq!(
        gw.get(&path, &ti.token).await.body,
        json!({"value": "x".repeat(900)})
    );
}
