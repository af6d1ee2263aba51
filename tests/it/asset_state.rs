//! Asset-state routes of both API generations against real metastore rows, on both stores.

use crate::gateway;

use airstate::store::{AssetKey, Writer};
use gateway::{by_name, by_uri, enc, token_for, unique, Asset, Backend, Gateway};
use serde_json::json;
use uuid::Uuid;

on_every_store!(
    name_and_uri_address_one_asset,
    writes_record_task_or_watcher,
    unknown_and_inactive_assets_are_404,
    query_validation_is_fastapi_shaped,
    delete_and_clear,
    aip103_paths_share_state_with_store_paths,
);

async fn name_and_uri_address_one_asset(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let put = gw
        .put_text(
            &by_name(&a, "watermark"),
            &ti.token,
            r#"{"value": {"date": "2026-04-29", "n": 1.0}}"#,
        )
        .await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = gw.get(&by_uri(&a, "watermark"), &ti.token).await;
    assert_eq!(got.text, r#"{"value":{"date": "2026-04-29", "n": 1.0}}"#);
    // Any valid execution token may read any active asset.
    let stranger = token_for(Uuid::new_v4());
    assert_eq!(
        gw.get(&by_name(&a, "watermark"), &stranger).await.status,
        200
    );
    let missing = gw.get(&by_name(&a, "nope"), &ti.token).await;
    assert_eq!(
        (missing.status, missing.body),
        (
            404,
            json!({"detail": {"reason": "not_found", "message": "Asset state store key 'nope' not found"}})
        )
    );
}

async fn writes_record_task_or_watcher(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let key = AssetKey(a.id.to_string());
    gw.put(&by_name(&a, "k"), &ti.token, json!({"value": 1}))
        .await;
    let writer = gw.state.store.asset_writer(&key, "k").await.unwrap();
    assert_eq!(
        writer,
        Some(Writer::Task {
            dag_id: ti.dag_id.clone(),
            run_id: ti.run_id.clone(),
            task_id: ti.task_id.clone(),
            map_index: -1
        })
    );
    let watcher = token_for(Uuid::nil());
    assert_eq!(
        gw.put(&by_uri(&a, "k"), &watcher, json!({"value": 2}))
            .await
            .status,
        204
    );
    assert_eq!(
        gw.state.store.asset_writer(&key, "k").await.unwrap(),
        Some(Writer::Watcher)
    );
    assert_eq!(
        gw.get(&by_name(&a, "k"), &ti.token).await.body,
        json!({"value": 2})
    );
    // A writer whose task instance is gone is refused, with Airflow's UUID repr.
    let ghost = Uuid::new_v4();
    let refused = gw
        .put(&by_name(&a, "k"), &token_for(ghost), json!({"value": 3}))
        .await;
    assert_eq!(refused.status, 404);
    assert_eq!(
        refused.body["detail"]["message"],
        json!(format!("Task instance UUID('{ghost}') not found"))
    );
    assert_eq!(
        gw.get(&by_name(&a, "k"), &ti.token).await.body,
        json!({"value": 2})
    );
}

async fn unknown_and_inactive_assets_are_404(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let name = format!("it's-{}", unique("gone"));
    let unknown = gw
        .get(
            &format!(
                "/execution/store/asset/by-name/value?name={}&key=k",
                enc(&name)
            ),
            &ti.token,
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body["detail"]["message"],
        json!(format!("Asset with name=\"{name}\" not found"))
    );
    let uri = format!("s3://x/{}", unique("nothing"));
    let unknown_uri = gw
        .delete(
            &format!("/execution/store/asset/by-uri/clear?uri={}", enc(&uri)),
            &ti.token,
        )
        .await;
    assert_eq!(
        unknown_uri.body,
        json!({"detail": {"reason": "not_found", "message": format!("Asset with uri='{uri}' not found")}})
    );
    // Inactive: in `asset` but not `asset_active`.
    let inactive_name = unique("inactive");
    let inactive_uri = format!("s3://old/{}", unique("p"));
    gw.pg
        .insert_asset(&inactive_name, &inactive_uri, false)
        .await;
    let a = Asset {
        id: 0,
        name: inactive_name,
        uri: inactive_uri,
    };
    assert_eq!(gw.get(&by_name(&a, "k"), &ti.token).await.status, 404);
    assert_eq!(gw.get(&by_uri(&a, "k"), &ti.token).await.status, 404);
    assert_eq!(
        gw.put(&by_name(&a, "k"), &ti.token, json!({"value": 1}))
            .await
            .status,
        404
    );
}

async fn query_validation_is_fastapi_shaped(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let missing = gw
        .get("/execution/store/asset/by-name/value", &ti.token)
        .await;
    assert_eq!(missing.status, 422);
    assert_eq!(
        missing.body,
        json!({"detail": [
            {"type": "missing", "loc": ["query", "name"], "msg": "Field required", "input": null},
            {"type": "missing", "loc": ["query", "key"], "msg": "Field required", "input": null}
        ]})
    );
    let empty_key = gw.get(&by_name(&a, ""), &ti.token).await;
    assert_eq!(
        empty_key.body["detail"][0]["type"],
        json!("string_too_short")
    );
    assert_eq!(empty_key.body["detail"][0]["loc"], json!(["query", "key"]));
    gw.put(&by_name(&a, "k"), &ti.token, json!({"value": "kept"}))
        .await;
    // Assets take no expires_at.
    let with_expiry = gw
        .put(
            &by_name(&a, "k"),
            &ti.token,
            json!({"value": 1, "expires_at": null}),
        )
        .await;
    assert_eq!(with_expiry.status, 422);
    assert_eq!(
        with_expiry.body["detail"][0]["loc"],
        json!(["body", "expires_at"])
    );
    let null = gw
        .put(&by_name(&a, "k"), &ti.token, json!({"value": null}))
        .await;
    assert_eq!(null.status, 422);
    assert_eq!(
        gw.get(&by_name(&a, "k"), &ti.token).await.body,
        json!({"value": "kept"})
    );
    // Workload tokens are refused here too.
    let mut workload = gateway::claims_for(ti.id);
    workload.insert("scope".into(), json!("workload"));
    assert_eq!(
        gw.get(&by_name(&a, "k"), &gateway::sign(&workload))
            .await
            .status,
        403
    );
    assert_eq!(
        gw.send("GET", &by_name(&a, "k"), None, None).await.status,
        401
    );
}

async fn delete_and_clear(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let other = gw.asset().await;
    for key in ["a", "b", "c"] {
        gw.put(&by_name(&a, key), &ti.token, json!({"value": key}))
            .await;
    }
    gw.put(&by_name(&other, "a"), &ti.token, json!({"value": "other"}))
        .await;
    for _ in 0..2 {
        assert_eq!(gw.delete(&by_uri(&a, "a"), &ti.token).await.status, 204);
    }
    assert_eq!(gw.get(&by_name(&a, "a"), &ti.token).await.status, 404);
    assert_eq!(gw.get(&by_name(&a, "b"), &ti.token).await.status, 200);
    let clear = format!("/execution/store/asset/by-name/clear?name={}", enc(&a.name));
    assert_eq!(gw.delete(&clear, &ti.token).await.status, 204);
    assert_eq!(gw.get(&by_name(&a, "b"), &ti.token).await.status, 404);
    assert_eq!(gw.get(&by_name(&a, "c"), &ti.token).await.status, 404);
    assert_eq!(
        gw.get(&by_name(&other, "a"), &ti.token).await.body,
        json!({"value": "other"})
    );
    let clear_uri = format!(
        "/execution/store/asset/by-uri/clear?uri={}",
        enc(&other.uri)
    );
    assert_eq!(gw.delete(&clear_uri, &ti.token).await.status, 204);
    assert_eq!(gw.get(&by_name(&other, "a"), &ti.token).await.status, 404);
}

async fn aip103_paths_share_state_with_store_paths(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let encoded_name: String = percent_path(&a.name);
    let seed = format!("/execution/state/asset/{encoded_name}/state/key");
    assert_eq!(
        gw.put(&seed, &ti.token, json!({"value": [1, 2]}))
            .await
            .status,
        204
    );
    assert_eq!(
        gw.get(&by_uri(&a, "state/key"), &ti.token).await.body,
        json!({"value": [1, 2]})
    );
    assert_eq!(
        gw.get(&seed, &ti.token).await.body,
        json!({"value": [1, 2]})
    );
    let clear = format!("/execution/state/asset/{encoded_name}");
    assert_eq!(gw.delete(&clear, &ti.token).await.status, 204);
    assert_eq!(gw.get(&seed, &ti.token).await.status, 404);
}

fn percent_path(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}
