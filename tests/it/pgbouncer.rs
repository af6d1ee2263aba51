//! Airflow's metastore behind a real PgBouncer in transaction pooling mode (the official
//! Airflow chart's `pgbouncer.enabled`), with a server pool smaller than airstate's own
//! pool, so consecutive statements of one airstate connection land on different server
//! connections. Everything airstate asks the metastore (task and asset identity, the asset
//! registration check, `import --from-metastore`) must work there: no named prepared
//! statement may outlive its transaction.

use crate::common;
use crate::gateway;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airstate::store::redis::RedisStore;
use airstate::store::{AssetKey, StateStore, TaskScope};
use common::{PgBouncer, Postgres, RedisServer, ServedBinary};
use futures_util::StreamExt;
use gateway::{enc, token_for, unique, Asset, SECRET};
use uuid::Uuid;

struct Task {
    id: Uuid,
    scope: TaskScope,
    token: String,
}

/// What one request is, and the status it must get.
struct Request {
    method: &'static str,
    path: String,
    token: String,
    body: Option<serde_json::Value>,
    expect: u16,
}

fn gateway_env<'a>(
    bouncer: &'a PgBouncer,
    prefix: &'a str,
    timeout_ms: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &bouncer.url),
        ("AIRSTATE_REDIS_URL", &RedisServer::shared().url),
        ("AIRSTATE_KEY_PREFIX", prefix),
        ("AIRSTATE_ASSET_REGISTRATION_CHECK", "true"),
        // Every request asks the metastore: nothing is answered from the cache.
        ("AIRSTATE_IDENTITY_CACHE_SECONDS", "0"),
        // More client connections than PgBouncer has server connections.
        ("AIRSTATE_METASTORE_POOL_SIZE", "8"),
        ("AIRSTATE_METASTORE_TIMEOUT_MS", timeout_ms),
    ]
}

async fn send(http: &reqwest::Client, base: &str, request: &Request) -> (u16, String) {
    let mut builder = http
        .request(
            request.method.parse().unwrap(),
            format!("{base}{}", request.path),
        )
        .bearer_auth(&request.token)
        .timeout(Duration::from_secs(20));
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    match builder.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

fn import_from_metastore(url: &str, prefix: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_airstate"))
        .args(["import", "--from-metastore"])
        .env_clear()
        .env("AIRSTATE_REDIS_URL", &RedisServer::shared().url)
        .env("AIRSTATE_KEY_PREFIX", prefix)
        .env("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", url)
        .output()
        .expect("airstate import")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_requests_and_imports_through_pgbouncer_in_transaction_mode() {
    const RUNS: usize = 4;
    const TASKS_PER_RUN: usize = 6;
    const ASSETS: usize = 6;
    const REQUESTS: usize = 600;
    const CONCURRENCY: usize = 48;
    const IMPORTS: usize = 4;

    let pg = Postgres::shared();
    let bouncer = PgBouncer::start(pg, 2);
    let direct = pg.client().await;
    let dag = unique("dag");

    let mut tasks = Vec::new();
    for run in 0..RUNS {
        for task in 0..TASKS_PER_RUN {
            let id = Uuid::now_v7();
            let mut scope = TaskScope {
                dag_id: dag.clone(),
                run_id: format!("manual__run-{run}"),
                task_id: format!("t{task}"),
                map_index: -1,
                run_key: None,
            };
            pg.insert_task_instance(id, &scope.dag_id, &scope.run_id, &scope.task_id, -1)
                .await;
            scope.run_key = Some(pg.dag_run_id(&scope.dag_id, &scope.run_id).await);
            tasks.push(Task {
                id,
                scope,
                token: token_for(id),
            });
        }
    }
    let mut assets = Vec::new();
    for _ in 0..ASSETS {
        let name = unique("asset");
        let uri = format!("s3://bucket/{name}");
        let id = pg.insert_asset(&name, &uri, true).await;
        assets.push(Asset { id, name, uri });
    }
    // Task tN uses asset N (an inlet when N is even, an outlet when odd); no other pair is
    // registered.
    for (n, asset) in assets.iter().enumerate().take(TASKS_PER_RUN) {
        let (table, extra, value) = if n % 2 == 0 {
            ("inlet", "", "")
        } else {
            ("outlet", ", allow_global_consumers", ", true")
        };
        direct
            .execute(
                &format!(
                    "INSERT INTO task_{table}_asset_reference \
                     (asset_id, dag_id, task_id, created_at, updated_at{extra}) \
                     VALUES ($1, $2, $3, now(), now(){value})"
                ),
                &[&asset.id, &dag, &format!("t{n}")],
            )
            .await
            .unwrap();
    }
    // Rows for import --from-metastore: two keys per task and per asset.
    for run in 0..RUNS {
        let run_id = format!("manual__run-{run}");
        let dag_run: i32 = direct
            .query_one(
                "SELECT id FROM dag_run WHERE dag_id = $1 AND run_id = $2",
                &[&dag, &run_id],
            )
            .await
            .unwrap()
            .get(0);
        for task in 0..TASKS_PER_RUN {
            for key in ["a", "b"] {
                direct
                    .execute(
                        "INSERT INTO task_state_store (dag_run_id, task_id, map_index, key, \
                         dag_id, run_id, value, updated_at) \
                         VALUES ($1, $2, -1, $3, $4, $5, '{\"n\": 1}', now())",
                        &[&dag_run, &format!("t{task}"), &key, &dag, &run_id],
                    )
                    .await
                    .unwrap();
            }
        }
    }
    for asset in &assets {
        for key in ["a", "b"] {
            direct
                .execute(
                    "INSERT INTO asset_state_store (asset_id, key, value, updated_at, \
                     last_updated_by_kind) VALUES ($1, $2, '[1]', now(), 'api')",
                    &[&asset.id, &key],
                )
                .await
                .unwrap();
        }
    }

    // The state the reads will find.
    let prefix = format!("{}:", unique("pgb"));
    let store = RedisStore::connect(
        &airstate::config::redis_defaults(&RedisServer::shared().url, &prefix).unwrap(),
    )
    .await
    .unwrap();
    for task in &tasks {
        store
            .put_task(&task.scope, "seed", "{\"seeded\": true}", None)
            .await
            .unwrap();
    }
    for asset in &assets {
        store
            .put_asset(
                &AssetKey(asset.id.to_string()),
                "seed",
                "7",
                &airstate::store::Writer::Api,
            )
            .await
            .unwrap();
    }

    // The gateway's log goes to a file: it names the metastore's errors when requests fail.
    let log = tempfile::NamedTempFile::new().unwrap();
    let gateway = ServedBinary::start(
        &gateway_env(&bouncer, &prefix, "5000"),
        Stdio::from(log.reopen().unwrap()),
    );

    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        let task = &tasks[(i * 7) % tasks.len()];
        let n: usize = task.scope.task_id[1..].parse().unwrap();
        // Half the asset requests go to the task's own asset, half to another one.
        let asset = if i % 2 == 0 {
            &assets[n % ASSETS]
        } else {
            &assets[(n + 1 + i % (ASSETS - 1)) % ASSETS]
        };
        let registered = asset.id == assets[n % ASSETS].id && n < ASSETS;
        let guarded = |ok: u16| if registered { ok } else { 403 };
        let token = task.token.clone();
        let request = match i % 6 {
            0 => Request {
                method: "GET",
                path: format!("/execution/store/ti/{}/seed", task.id),
                token,
                body: None,
                expect: 200,
            },
            1 => Request {
                method: "PUT",
                path: format!("/execution/store/ti/{}/k{i}", task.id),
                token,
                body: Some(serde_json::json!({"value": i})),
                expect: 204,
            },
            2 => Request {
                method: "GET",
                path: format!(
                    "/execution/store/asset/by-name/value?name={}&key=seed",
                    enc(&asset.name)
                ),
                token,
                body: None,
                expect: guarded(200),
            },
            3 => Request {
                method: "PUT",
                path: format!(
                    "/execution/store/asset/by-uri/value?uri={}&key=k{i}",
                    enc(&asset.uri)
                ),
                token,
                body: Some(serde_json::json!({"value": [i]})),
                expect: guarded(204),
            },
            4 => Request {
                method: "GET",
                path: format!("/execution/state/asset/{}/seed", enc(&asset.name)),
                token,
                body: None,
                expect: guarded(200),
            },
            _ => Request {
                method: "GET",
                path: format!(
                    "/execution/store/asset/by-name/value?name={}&key=seed",
                    enc(&unique("no-such-asset"))
                ),
                token,
                body: None,
                expect: 404,
            },
        };
        requests.push(request);
    }

    // Imports run through the same PgBouncer while the requests are under way.
    let import_prefix = format!("{}:", unique("pgb-import"));
    let imports: Vec<_> = (0..IMPORTS)
        .map(|_| {
            let url = bouncer.url.clone();
            let prefix = import_prefix.clone();
            tokio::task::spawn_blocking(move || import_from_metastore(&url, &prefix))
        })
        .collect();

    let http = reqwest::Client::new();
    let base = Arc::new(gateway.base.clone());
    let started = Instant::now();
    let outcomes: Vec<(usize, u16, String)> =
        futures_util::stream::iter(requests.iter().enumerate())
            .map(|(i, request)| {
                let http = http.clone();
                let base = base.clone();
                async move {
                    let (status, body) = send(&http, &base, request).await;
                    (i, status, body)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let elapsed = started.elapsed();

    let mut failures: Vec<String> = outcomes
        .iter()
        .filter(|(i, status, _)| *status != requests[*i].expect)
        .map(|(i, status, body)| {
            let request = &requests[*i];
            format!(
                "{} {} wanted {} got {status}: {body}",
                request.method, request.path, request.expect
            )
        })
        .collect();
    failures.sort();
    eprintln!(
        "{} requests ({} concurrent) through PgBouncer in {elapsed:?}: {} failed",
        REQUESTS,
        CONCURRENCY,
        failures.len()
    );
    let mut import_failures = Vec::new();
    for import in imports {
        let output = import.await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            import_failures.push(stderr);
        } else {
            assert!(stderr.contains("imported"), "{stderr}");
        }
    }
    eprintln!(
        "{IMPORTS} concurrent imports: {} failed",
        import_failures.len()
    );
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for line in std::fs::read_to_string(log.path()).unwrap().lines() {
        if let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(reason) = entry["reason"].as_str() {
                let digitless: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
                *reasons.entry(digitless).or_default() += 1;
            }
        }
    }
    assert!(
        failures.is_empty() && import_failures.is_empty(),
        "{} of {REQUESTS} requests failed, first: {:#?}\nthe gateway's reasons: {reasons:#?}\n\
         {} of {IMPORTS} imports failed: {import_failures:#?}",
        failures.len(),
        &failures[..failures.len().min(5)],
        import_failures.len()
    );

    // The reads saw the seeded values, and the imports wrote the rows.
    let reply = send(&http, &gateway.base, &requests[0]).await;
    assert_eq!(reply, (200, r#"{"value":{"seeded": true}}"#.to_owned()));
    let imported = RedisStore::connect(
        &airstate::config::redis_defaults(&RedisServer::shared().url, &import_prefix).unwrap(),
    )
    .await
    .unwrap();
    for task in &tasks {
        let value = imported.get_task(&task.scope, "b").await.unwrap();
        assert_eq!(value.map(|v| v.json).as_deref(), Some(r#"{"n": 1}"#));
    }
    for asset in &assets {
        let value = imported
            .get_asset(&AssetKey(asset.id.to_string()), "a")
            .await
            .unwrap();
        assert_eq!(value.map(|v| v.json).as_deref(), Some("[1]"));
    }
}

/// Waiting for a server connection (PgBouncer queues a client while its pool is busy) counts
/// against `AIRSTATE_METASTORE_TIMEOUT_MS` like a slow statement: a 503, not a request that
/// hangs for PgBouncer's `query_wait_timeout`; and the pool recovers once PgBouncer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_queued_behind_a_busy_pgbouncer_pool_times_out_as_503() {
    let pg = Postgres::shared();
    let bouncer = PgBouncer::start(pg, 2);
    let prefix = format!("{}:", unique("pgb-wait"));
    let log = tempfile::NamedTempFile::new().unwrap();
    let gateway = ServedBinary::start(
        &gateway_env(&bouncer, &prefix, "500"),
        Stdio::from(log.reopen().unwrap()),
    );
    let http = reqwest::Client::new();
    let ti = Uuid::now_v7();
    pg.insert_task_instance(ti, &unique("dag"), "manual__1", "t", -1)
        .await;
    let read = Request {
        method: "GET",
        path: format!("/execution/store/ti/{ti}/missing"),
        token: token_for(ti),
        body: None,
        expect: 404,
    };
    // Warm: the gateway has its connections to PgBouncer before the pool is taken.
    let (status, body) = send(&http, &gateway.base, &read).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("key 'missing' not found"), "{body}");

    // Two open transactions hold both of PgBouncer's server connections.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let client = bouncer.client().await;
        client.batch_execute("BEGIN; SELECT 1").await.unwrap();
        holders.push(client);
    }
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = send(&http, &gateway.base, &read).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        // Pool wait, connecting and the statement are each bounded by the 500 ms (PgBouncer
        // itself would hold the query for its query_wait_timeout, 60 s here).
        assert!(took < Duration::from_secs(5), "took {took:?}");
        eprintln!("queued behind a busy PgBouncer pool: 503 after {took:?}");
    }
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        logged.contains("metastore query timed out after 500 ms"),
        "{logged}"
    );

    for holder in &holders {
        holder.batch_execute("COMMIT").await.unwrap();
    }
    let started = Instant::now();
    loop {
        let (status, body) = send(&http, &gateway.base, &read).await;
        if status == 404 {
            assert!(body.contains("key 'missing' not found"), "{body}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no recovery: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
