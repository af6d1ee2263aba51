//! airstate's extensions beyond Airflow's API, on both stores: optimistic concurrency
//! (ETag / If-Match / If-None-Match) and bulk reads.

use crate::common;
use crate::gateway;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;

use common::{redis_cli, RedisServer};
use gateway::{by_name, enc, ti_path, Backend, Gateway, Reply};
use serde_json::{json, Value};

on_every_store!(
    every_write_gets_a_new_etag_even_after_recreate,
    conditional_task_writes,
    conditional_asset_writes,
    malformed_conditions_are_400_and_change_nothing,
    if_match_writers_exactly_one_wins_per_version,
    if_match_counter_loses_no_update_under_contention,
    bulk_read_returns_exact_values_etags_and_missing,
    bulk_read_of_1000_keys_is_one_call_and_one_round_trip,
    bulk_read_validation,
);

/// A request with extra headers; `body` is sent as JSON when given.
async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let bearer = format!("Bearer {token}");
    let mut all = vec![("authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    let text = match &body {
        Some(body) => {
            all.push(("content-type", "application/json"));
            body.to_string()
        }
        None => String::new(),
    };
    gw.send_raw(method, path, &all, &text).await
}

fn etag(reply: &Reply) -> String {
    let tag = reply
        .header("etag")
        .unwrap_or_else(|| panic!("no ETag: {reply:?}"));
    assert!(
        tag.starts_with('"') && tag.ends_with('"') && tag.len() > 2,
        "{tag}"
    );
    tag.to_owned()
}

async fn every_write_gets_a_new_etag_even_after_recreate(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let mut seen = HashSet::new();
    for round in 0..3 {
        // The same value each time: the version must still change.
        let put = gw.put(&path, &ti.token, json!({"value": 1})).await;
        assert_eq!(put.status, 204, "{put:?}");
        let got = gw.get(&path, &ti.token).await;
        assert_eq!(got.body, json!({"value": 1}));
        assert_eq!(etag(&got), etag(&put), "PUT and GET disagree");
        assert!(seen.insert(etag(&got)), "ETag repeated in round {round}");
        // Deleted and recreated: no old version comes back (ABA).
        assert_eq!(gw.delete(&path, &ti.token).await.status, 204);
    }
    let a = gw.asset().await;
    let put = gw
        .put(&by_name(&a, "k"), &ti.token, json!({"value": 1}))
        .await;
    let got = gw.get(&by_name(&a, "k"), &ti.token).await;
    assert_eq!(etag(&put), etag(&got));
    assert!(seen.insert(etag(&got)));
    // The unconditional routes Airflow uses answer exactly as before, plus the header.
    assert_eq!(got.text, r#"{"value":1}"#);
}

async fn conditional_task_writes(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "lease");
    let t = ti.token.as_str();
    let create = [("if-none-match", "*")];
    let made = call(&gw, "PUT", &path, t, &create, Some(json!({"value": "a"}))).await;
    assert_eq!(made.status, 204, "{made:?}");
    let first = etag(&made);
    let again = call(&gw, "PUT", &path, t, &create, Some(json!({"value": "b"}))).await;
    assert_eq!(again.status, 412, "{again:?}");
    assert_eq!(again.body["detail"]["reason"], "precondition_failed");
    assert_eq!(gw.get(&path, t).await.body, json!({"value": "a"}));

    let moved = call(
        &gw,
        "PUT",
        &path,
        t,
        &[("if-match", &first)],
        Some(json!({"value": "c"})),
    )
    .await;
    assert_eq!(moved.status, 204, "{moved:?}");
    let second = etag(&moved);
    // The first version is gone: a writer holding it loses and changes nothing.
    let stale = call(
        &gw,
        "PUT",
        &path,
        t,
        &[("if-match", &first)],
        Some(json!({"value": "d"})),
    )
    .await;
    assert_eq!(stale.status, 412);
    let stale_delete = call(&gw, "DELETE", &path, t, &[("if-match", &first)], None).await;
    assert_eq!(stale_delete.status, 412);
    assert_eq!(gw.get(&path, t).await.body, json!({"value": "c"}));
    // A list of tags matches any of them; W/ tags never match If-Match (strong compare).
    let weak = format!("W/{second}");
    let weak_put = call(
        &gw,
        "PUT",
        &path,
        t,
        &[("if-match", &weak)],
        Some(json!({"value": 0})),
    )
    .await;
    assert_eq!(weak_put.status, 412);

    // GET with If-None-Match of the current version: 304 and no body.
    let unchanged = call(&gw, "GET", &path, t, &[("if-none-match", &weak)], None).await;
    assert_eq!((unchanged.status, unchanged.text.as_str()), (304, ""));
    assert_eq!(etag(&unchanged), second);
    let changed = call(&gw, "GET", &path, t, &[("if-none-match", &first)], None).await;
    assert_eq!(changed.status, 200);

    let list = format!("{first}, {second}");
    let deleted = call(&gw, "DELETE", &path, t, &[("if-match", &list)], None).await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    assert_eq!(gw.get(&path, t).await.status, 404);
    // If-Match on a missing key fails (`*` too); an unconditional delete still succeeds.
    for tag in ["*", second.as_str()] {
        let gone = call(&gw, "DELETE", &path, t, &[("if-match", tag)], None).await;
        assert_eq!(gone.status, 412, "{tag}");
        let put = call(
            &gw,
            "PUT",
            &path,
            t,
            &[("if-match", tag)],
            Some(json!({"value": 1})),
        )
        .await;
        assert_eq!(put.status, 412, "{tag}");
    }
    assert_eq!(gw.get(&path, t).await.status, 404);
    assert_eq!(gw.delete(&path, t).await.status, 204);

    // An expired key counts as absent: create-only succeeds over it.
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(300)).to_rfc3339();
    let expiring = gw
        .put(&path, t, json!({"value": 1, "expires_at": soon}))
        .await;
    assert_eq!(expiring.status, 204, "{expiring:?}");
    let early = call(&gw, "PUT", &path, t, &create, Some(json!({"value": 2}))).await;
    assert_eq!(early.status, 412);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gw.get(&path, t).await.status != 404 {
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let late = call(&gw, "PUT", &path, t, &create, Some(json!({"value": 3}))).await;
    assert_eq!(late.status, 204, "{late:?}");
    assert_eq!(gw.get(&path, t).await.body, json!({"value": 3}));
}

async fn conditional_asset_writes(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let path = by_name(&a, "watermark");
    let t = ti.token.as_str();
    let create = [("if-none-match", "*")];
    let made = call(&gw, "PUT", &path, t, &create, Some(json!({"value": 1}))).await;
    assert_eq!(made.status, 204, "{made:?}");
    let again = call(&gw, "PUT", &path, t, &create, Some(json!({"value": 2}))).await;
    assert_eq!(again.status, 412);
    let tag = etag(&made);
    let moved = call(
        &gw,
        "PUT",
        &path,
        t,
        &[("if-match", &tag)],
        Some(json!({"value": 3})),
    )
    .await;
    assert_eq!(moved.status, 204);
    let stale = call(&gw, "DELETE", &path, t, &[("if-match", &tag)], None).await;
    assert_eq!(stale.status, 412);
    assert_eq!(gw.get(&path, t).await.body, json!({"value": 3}));
    // The AIP-103 path shape honours the same headers and sees the same versions.
    let seed = format!("/execution/state/asset/{}/watermark", enc(&a.name));
    let seed_get = gw.get(&seed, t).await;
    assert_eq!(etag(&seed_get), etag(&moved));
    let current = etag(&moved);
    let deleted = call(&gw, "DELETE", &seed, t, &[("if-match", &current)], None).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(gw.get(&path, t).await.status, 404);
}

async fn malformed_conditions_are_400_and_change_nothing(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let t = ti.token.as_str();
    gw.put(&path, t, json!({"value": "kept"})).await;
    for (name, value) in [
        ("if-match", "no-quotes"),
        ("if-match", "*, \"abc\""),
        ("if-none-match", "\"unterminated"),
    ] {
        for method in ["PUT", "DELETE"] {
            let body = (method == "PUT").then(|| json!({"value": "lost"}));
            let reply = call(&gw, method, &path, t, &[(name, value)], body).await;
            assert_eq!(reply.status, 400, "{method} {name}: {value}: {reply:?}");
            let detail = reply.body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(name), "{detail}");
        }
    }
    assert_eq!(gw.get(&path, t).await.body, json!({"value": "kept"}));
}

/// Many writers race with the same version: exactly one wins each round.
async fn if_match_writers_exactly_one_wins_per_version(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let a = gw.asset().await;
    let mut tokens = Vec::new();
    for _ in 0..16 {
        tokens.push(gw.task().await.token);
    }
    let path = by_name(&a, "leader");
    let first = gw.put(&path, &tokens[0], json!({"value": "nobody"})).await;
    let mut current = etag(&first);
    for round in 0..5 {
        let mut racers = tokio::task::JoinSet::new();
        for (i, token) in tokens.iter().enumerate() {
            let request = gw
                .http
                .put(format!("{}{path}", gw.base))
                .bearer_auth(token)
                .header("if-match", current.clone())
                .json(&json!({"value": format!("writer {i}")}));
            racers.spawn(async move {
                let reply = request.send().await.expect("request");
                let tag = reply
                    .headers()
                    .get("etag")
                    .map(|v| v.to_str().unwrap().to_owned());
                (i, reply.status().as_u16(), tag)
            });
        }
        let mut winners = Vec::new();
        while let Some(outcome) = racers.join_next().await {
            let (i, status, tag) = outcome.unwrap();
            match status {
                204 => winners.push((i, tag.expect("winner's ETag"))),
                412 => {}
                other => panic!("round {round}: writer {i} got {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (winner, tag) = winners.pop().unwrap();
        let got = gw.get(&path, &tokens[0]).await;
        assert_eq!(got.body, json!({"value": format!("writer {winner}")}));
        assert_eq!(etag(&got), tag);
        current = tag;
    }
}

/// Read-modify-write with If-Match from many tasks at once: no increment is lost.
async fn if_match_counter_loses_no_update_under_contention(backend: Backend) {
    const WRITERS: usize = 12;
    const EACH: i64 = 8;
    let gw = Gateway::start(backend).await;
    let a = gw.asset().await;
    let path = format!("{}{}", gw.base, by_name(&a, "counter"));
    let seed = gw.task().await;
    gw.put(&by_name(&a, "counter"), &seed.token, json!({"value": 0}))
        .await;
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let token = gw.task().await.token;
        let http = gw.http.clone();
        let path = path.clone();
        writers.spawn(async move {
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    let got = http.get(&path).bearer_auth(&token).send().await.unwrap();
                    let tag = got.headers()["etag"].to_str().unwrap().to_owned();
                    let body: Value = got.json().await.unwrap();
                    let next = body["value"].as_i64().unwrap() + 1;
                    let put = http
                        .put(&path)
                        .bearer_auth(&token)
                        .header("if-match", tag)
                        .json(&json!({"value": next}))
                        .send()
                        .await
                        .unwrap();
                    match put.status().as_u16() {
                        204 => break,
                        412 => conflicts += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
            }
            conflicts
        });
    }
    let mut conflicts = 0;
    while let Some(done) = writers.join_next().await {
        conflicts += done.unwrap();
    }
    let total = gw.get(&by_name(&a, "counter"), &seed.token).await;
    assert_eq!(total.body, json!({"value": WRITERS as i64 * EACH}));
    // Contention really happened, so the test proves the check, not luck.
    assert!(conflicts > 0, "no writer ever conflicted");
}

async fn bulk_read_returns_exact_values_etags_and_missing(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let t = ti.token.as_str();
    let base = format!("/execution/store/ti/{}", ti.id);
    gw.put_text(&ti_path(&ti, "a"), t, r#"{"value": 1.0}"#)
        .await;
    gw.put_text(
        &ti_path(&ti, "b"),
        t,
        r#"{"value": 123456789012345678901234567890}"#,
    )
    .await;
    gw.put_text(
        &ti_path(&ti, "x%2Cy"),
        t,
        r#"{"value": {"z": 1, "a": [true, null]}}"#,
    )
    .await;
    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(200)).to_rfc3339();
    gw.put(
        &ti_path(&ti, "brief"),
        t,
        json!({"value": 1, "expires_at": soon}),
    )
    .await;
    let etag_a = etag(&gw.get(&ti_path(&ti, "a"), t).await);

    // Keys come back in the order asked, values as the exact text sent.
    let got = gw.get(&format!("{base}?keys=b,nope,a"), t).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        got.text,
        format!(
            r#"{{"values":{{"b":123456789012345678901234567890,"a":1.0}},"etags":{{"b":{},"a":{}}},"missing":["nope"]}}"#,
            json!(etag(&gw.get(&ti_path(&ti, "b"), t).await)),
            json!(etag_a)
        )
    );
    // POST takes any key, commas included; repeats are answered once.
    let posted = gw
        .send(
            "POST",
            &base,
            Some(t),
            Some(json!({"keys": ["x,y", "a", "a"]})),
        )
        .await;
    assert_eq!(posted.status, 200, "{posted:?}");
    assert_eq!(
        posted.body["values"],
        json!({"x,y": {"z": 1, "a": [true, null]}, "a": 1.0})
    );
    assert_eq!(posted.body["missing"], json!([]));
    // An expired key is reported missing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let reply = gw.get(&format!("{base}?keys=brief,a"), t).await;
        if reply.body["missing"] == json!(["brief"]) {
            assert_eq!(reply.body["values"], json!({"a": 1.0}));
            break;
        }
        assert_eq!(reply.body["values"]["brief"], json!(1));
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let a = gw.asset().await;
    gw.put_text(&by_name(&a, "w"), t, r#"{"value": "2026-04-29"}"#)
        .await;
    let values = format!(
        "/execution/store/asset/by-name/values?name={}",
        enc(&a.name)
    );
    let got = gw.get(&format!("{values}&keys=w,q"), t).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body["values"], json!({"w": "2026-04-29"}));
    assert_eq!(got.body["missing"], json!(["q"]));
    assert_eq!(
        got.body["etags"]["w"],
        json!(etag(&gw.get(&by_name(&a, "w"), t).await))
    );
    let posted = gw
        .send("POST", &values, Some(t), Some(json!({"keys": ["q", "w"]})))
        .await;
    assert_eq!(posted.body["values"], json!({"w": "2026-04-29"}));
}

/// Counts of each Redis command run so far (`INFO commandstats`).
fn command_counts(port: u16) -> BTreeMap<String, u64> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            let calls = rest.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

async fn bulk_read_of_1000_keys_is_one_call_and_one_round_trip(backend: Backend) {
    // A Redis of this test's own, so that its command counts are this test's alone.
    let own = (backend == Backend::Redis).then(RedisServer::start);
    let url = own
        .as_ref()
        .map(|server| server.url.clone())
        .unwrap_or_default();
    let gw = Gateway::start_with(backend, &[("AIRSTATE_REDIS_URL", &url)]).await;
    let ti = gw.task().await;
    let a = gw.asset().await;
    let scope = airstate::store::TaskScope {
        dag_id: ti.dag_id.clone(),
        run_id: ti.run_id.clone(),
        task_id: ti.task_id.clone(),
        map_index: -1,
        run_key: Some(gw.pg.dag_run_id(&ti.dag_id, &ti.run_id).await),
    };
    let asset_key = airstate::store::AssetKey(
        gw.pg
            .client()
            .await
            .query_one("SELECT id FROM asset WHERE name = $1", &[&a.name])
            .await
            .unwrap()
            .get::<_, i32>(0)
            .to_string(),
    );
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 10 != 7) {
        gw.state
            .store
            .put_task(&scope, key, &i.to_string(), None)
            .await
            .unwrap();
        gw.state
            .store
            .put_asset(
                &asset_key,
                key,
                &format!("[{i}]"),
                &airstate::store::Writer::Watcher,
            )
            .await
            .unwrap();
    }
    let expected_missing: Vec<Value> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 7)
        .map(|(_, key)| json!(key))
        .collect();

    let before = own.as_ref().map(|server| command_counts(server.port));
    let got = gw
        .get(
            &format!("/execution/store/ti/{}?keys={}", ti.id, keys.join(",")),
            &ti.token,
        )
        .await;
    let after = own.as_ref().map(|server| command_counts(server.port));
    assert_eq!(got.status, 200, "{got:?}");
    let values = got.body["values"].as_object().unwrap();
    assert_eq!(values.len(), 900);
    assert_eq!(values["key-999"], json!(999));
    assert_eq!(got.body["etags"].as_object().unwrap().len(), 900);
    assert_eq!(got.body["missing"], Value::Array(expected_missing.clone()));
    if let (Some(before), Some(after)) = (before, after) {
        let ran: BTreeMap<&String, u64> = after
            .iter()
            .filter(|(name, _)| !["info", "zrangebyscore"].contains(&name.as_str()))
            .map(|(name, calls)| (name, calls - before.get(name).copied().unwrap_or(0)))
            .filter(|(_, calls)| *calls > 0)
            .collect();
        // One script call (Redis counts the commands it runs inside: the scope's
        // generation from the registry, one size check and one read per key, in the same
        // atomic step).
        assert_eq!(
            ran,
            BTreeMap::from([
                (&"evalsha".to_owned(), 1),
                (&"hmget".to_owned(), 1),
                (&"hget".to_owned(), 1000),
                (&"hstrlen".to_owned(), 1000),
            ]),
            "one EVALSHA of bulk_read.lua and nothing else"
        );
    }

    let posted = gw
        .send(
            "POST",
            &format!(
                "/execution/store/asset/by-name/values?name={}",
                enc(&a.name)
            ),
            Some(&ti.token),
            Some(json!({ "keys": keys })),
        )
        .await;
    assert_eq!(posted.status, 200, "{posted:?}");
    assert_eq!(posted.body["values"].as_object().unwrap().len(), 900);
    assert_eq!(posted.body["values"]["key-12"], json!([12]));
    assert_eq!(posted.body["missing"], Value::Array(expected_missing));
}

async fn bulk_read_validation(backend: Backend) {
    let gw = Gateway::start(backend).await;
    let ti = gw.task().await;
    let t = ti.token.as_str();
    let base = format!("/execution/store/ti/{}", ti.id);
    gw.put(&ti_path(&ti, "k"), t, json!({"value": 1})).await;
    // Without `keys` (or an event-stream Accept) the clear path answers GET as Airflow
    // does: 405.
    let no_keys = gw.get(&base, t).await;
    assert_eq!(
        (no_keys.status, no_keys.body),
        (405, json!({"detail": "Method Not Allowed"}))
    );
    let asset_no_keys = gw
        .get("/execution/store/asset/by-name/values?name=x", t)
        .await;
    assert_eq!(asset_no_keys.status, 422, "{asset_no_keys:?}");
    assert_eq!(
        asset_no_keys.body["detail"][0]["loc"],
        json!(["query", "keys"])
    );
    let empty = gw.get(&format!("{base}?keys=k,,"), t).await;
    assert_eq!(empty.status, 422);
    assert_eq!(empty.body["detail"][0]["type"], "string_too_short");
    let too_many: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    let over = gw
        .send("POST", &base, Some(t), Some(json!({ "keys": too_many })))
        .await;
    assert_eq!(over.status, 422, "{over:?}");
    for body in [
        json!({"keys": "k"}),
        json!({"keys": [1]}),
        json!({}),
        json!([]),
    ] {
        let bad = gw.send("POST", &base, Some(t), Some(body.clone())).await;
        assert_eq!(bad.status, 422, "{body}: {bad:?}");
    }
    let not_json = gw
        .send_raw(
            "POST",
            &base,
            &[("authorization", &format!("Bearer {t}"))],
            "{",
        )
        .await;
    assert_eq!(not_json.status, 422);
    // Another task instance's token cannot read this scope (ti:self), as for one key.
    let other = gw.task().await;
    assert_eq!(
        gw.get(&format!("{base}?keys=k"), &other.token).await.status,
        403
    );
    assert_eq!(
        gw.send("GET", &format!("{base}?keys=k"), None, None)
            .await
            .status,
        401
    );
    // An unknown asset is Airflow's asset 404.
    let unknown = gw
        .get(
            "/execution/store/asset/by-name/values?name=nope-x&keys=k",
            t,
        )
        .await;
    assert_eq!(unknown.status, 404);
    // Nothing above changed the data.
    assert_eq!(
        gw.get(&ti_path(&ti, "k"), t).await.body,
        json!({"value": 1})
    );
}

/// A value stored before versions existed (`<updated_ms>::<json>`) reads with a version
/// derived from its write time, which If-Match honours until the next write replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_before_versions_get_a_legacy_etag() {
    let gw = Gateway::start(Backend::Redis).await;
    let port = RedisServer::shared().port;
    let ti = gw.task().await;
    let path = ti_path(&ti, "old");
    gw.put(&path, &ti.token, json!({"value": "new"})).await;
    let scope = redis_cli(
        port,
        &["--scan", "--pattern", &format!("{}{{t:*}}:-1", gw.prefix)],
    );
    assert_eq!(scope.lines().count(), 1, "{scope:?}");
    redis_cli(port, &["HSET", &scope, "old", "1700000000123::\"old\""]);

    let got = gw.get(&path, &ti.token).await;
    assert_eq!(got.body, json!({"value": "old"}));
    assert_eq!(etag(&got), "\"L1700000000123\"");
    let stale = call(
        &gw,
        "PUT",
        &path,
        &ti.token,
        &[("if-match", "\"L1700000000124\"")],
        Some(json!({"value": 0})),
    )
    .await;
    assert_eq!(stale.status, 412);
    let moved = call(
        &gw,
        "PUT",
        &path,
        &ti.token,
        &[("if-match", "\"L1700000000123\"")],
        Some(json!({"value": 1})),
    )
    .await;
    assert_eq!(moved.status, 204, "{moved:?}");
    assert_ne!(etag(&moved), "\"L1700000000123\"");
    let again = call(
        &gw,
        "PUT",
        &path,
        &ti.token,
        &[("if-match", "\"L1700000000123\"")],
        Some(json!({"value": 2})),
    )
    .await;
    assert_eq!(again.status, 412);
    assert_eq!(gw.get(&path, &ti.token).await.body, json!({"value": 1}));
}
