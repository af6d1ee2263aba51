//! A gateway under test: the real router on a loopback port, over a real Redis (or the
//! embedded store) and a real PostgreSQL holding Airflow's metastore tables.

#![allow(dead_code)]

pub mod load;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use airstate::config::Config;
use airstate::http::AppState;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::common::{Postgres, RedisCluster, RedisServer};

/// Declares each behaviour (an `async fn(Backend)` at the test crate's root) once and runs
/// it against every store: `memory::<name>`, `redis::<name>` (a standalone server) and
/// `cluster::<name>` (a Redis Cluster of three primaries and three replicas).
#[allow(unused_macros)]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Redis).await })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Cluster).await })*
        }
    };
}

pub const SECRET: &str = "test-secret-that-is-long-enough-for-hs512";
pub const AUDIENCE: &str = "urn:airflow.apache.org:task";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    Cluster,
}

pub struct Gateway {
    pub base: String,
    pub http: reqwest::Client,
    pub state: Arc<AppState>,
    pub pg: &'static Postgres,
    pub prefix: String,
    server: Server,
}

/// Where the router under test runs.
enum Server {
    /// A task of this test process (most tests: fast, and `state` is the served state).
    Task(tokio::task::JoinHandle<()>),
    /// An `airstate serve` process of its own, for a test that reads process-wide state
    /// such as the metrics recorder, which every gateway in this process shares.
    Process(crate::common::ServedBinary),
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Server::Task(task) = &self.server {
            task.abort();
        }
    }
}

/// A task instance row created for one test, with a token for it.
pub struct Ti {
    pub id: Uuid,
    pub dag_id: String,
    pub run_id: String,
    pub task_id: String,
    pub map_index: i32,
    pub token: String,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

pub fn unique(label: &str) -> String {
    format!("{label}-{}", Uuid::new_v4().simple())
}

impl Gateway {
    pub async fn start(backend: Backend) -> Gateway {
        Self::start_with(backend, &[]).await
    }

    /// Starts a gateway whose configuration is the defaults for `backend` plus `extra`
    /// environment entries (which win).
    pub async fn start_with(backend: Backend, extra: &[(&str, &str)]) -> Gateway {
        Self::launch(backend, extra, false).await
    }

    /// As [`Gateway::start_with`], but the router runs as an `airstate serve` process of its
    /// own (`state` is then an equally configured state over the same stores).
    pub async fn start_as_process(backend: Backend, extra: &[(&str, &str)]) -> Gateway {
        Self::launch(backend, extra, true).await
    }

    async fn launch(backend: Backend, extra: &[(&str, &str)], own_process: bool) -> Gateway {
        let pg = Postgres::shared();
        let prefix = format!("test-{}:", Uuid::new_v4().simple());
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("AIRFLOW__API_AUTH__JWT_SECRET".into(), SECRET.into());
        env.insert("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN".into(), pg.url.clone());
        env.insert("AIRSTATE_LISTEN".into(), "127.0.0.1:0".into());
        env.insert("AIRSTATE_KEY_PREFIX".into(), prefix.clone());
        env.insert("AIRSTATE_IDENTITY_CACHE_SECONDS".into(), "1".into());
        let url_given = extra.iter().any(|(name, _)| *name == "AIRSTATE_REDIS_URL");
        match backend {
            _ if url_given => {}
            Backend::Memory => {}
            Backend::Redis => {
                env.insert(
                    "AIRSTATE_REDIS_URL".into(),
                    RedisServer::shared().url.clone(),
                );
            }
            Backend::Cluster => {
                env.insert(
                    "AIRSTATE_REDIS_URL".into(),
                    RedisCluster::shared().url.clone(),
                );
            }
        }
        for (name, value) in extra {
            env.insert((*name).into(), (*value).into());
        }
        env.retain(|_, value| !value.is_empty());
        let config = Config::from_lookup(|name| env.get(name).cloned()).expect("test config");
        let state = airstate::build_state(&config).await.expect("gateway state");
        let (base, server) = if own_process {
            env.remove("AIRSTATE_LISTEN");
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let served = crate::common::ServedBinary::start(&env, std::process::Stdio::null());
            (served.base.clone(), Server::Process(served))
        } else {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            // The server `airstate serve` runs, limits and all, on the same service.
            let app = airstate::http::app(state.clone());
            let (phase, stopping) = airstate::server::Stopping::channel();
            let task = tokio::spawn(async move {
                // Held by the task: the server stops when the task is aborted, never
                // because the sender went away.
                let _phase = phase;
                airstate::server::run(listener, app, config.server, stopping).await;
            });
            (base, Server::Task(task))
        };
        Gateway {
            base,
            http: reqwest::Client::new(),
            state,
            pg,
            prefix,
            server,
        }
    }

    /// A gateway on the Redis at `url` (any topology), shareable with load tasks.
    pub async fn on_redis(url: &str, extra: &[(&str, &str)]) -> Arc<Gateway> {
        let mut env = vec![("AIRSTATE_REDIS_URL", url)];
        env.extend_from_slice(extra);
        Arc::new(Gateway::start_with(Backend::Redis, &env).await)
    }

    /// A fresh task instance (unique dag/run so tests never share state).
    pub async fn task(&self) -> Ti {
        self.task_at(&unique("dag"), &unique("run"), "task", -1)
            .await
    }

    pub async fn task_at(&self, dag_id: &str, run_id: &str, task_id: &str, map_index: i32) -> Ti {
        let id = Uuid::now_v7();
        self.pg
            .insert_task_instance(id, dag_id, run_id, task_id, map_index)
            .await;
        Ti {
            id,
            dag_id: dag_id.into(),
            run_id: run_id.into(),
            task_id: task_id.into(),
            map_index,
            token: token_for(id),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        reply(request).await
    }

    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        reply(request.body(body.to_owned())).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send("GET", path, Some(token), None).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.send("DELETE", path, Some(token), None).await
    }

    /// PUT with the body text exactly as given (for values whose text matters).
    pub async fn put_text(&self, path: &str, token: &str, body: &str) -> Reply {
        let bearer = format!("Bearer {token}");
        self.send_raw(
            "PUT",
            path,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }
}

async fn reply(request: reqwest::RequestBuilder) -> Reply {
    let response = request
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Claims as Airflow mints them for an execution token.
pub fn claims_for(sub: Uuid) -> Map<String, Value> {
    let now = now();
    json!({
        "sub": sub.to_string(),
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": Uuid::new_v4().simple().to_string(),
        "scope": "execution",
    })
    .as_object()
    .unwrap()
    .clone()
}

pub fn sign(claims: &Map<String, Value>) -> String {
    sign_with(Algorithm::HS512, SECRET.as_bytes(), claims)
}

pub fn sign_with(algorithm: Algorithm, secret: &[u8], claims: &Map<String, Value>) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub fn token_for(sub: Uuid) -> String {
    sign(&claims_for(sub))
}

pub fn ti_path(ti: &Ti, key: &str) -> String {
    format!("/execution/store/ti/{}/{key}", ti.id)
}

/// `text` as a query-string value (form-urlencoded).
pub fn enc(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// `text` as one path segment: everything but RFC 3986's unreserved characters escaped.
pub fn seg(text: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}

/// An asset row created for one test. Its name holds slashes, as Airflow's often do.
pub struct Asset {
    pub id: i32,
    pub name: String,
    pub uri: String,
}

impl Gateway {
    /// A fresh active asset in the metastore.
    pub async fn asset(&self) -> Asset {
        let name = format!("team/sales/{}", unique("orders"));
        let uri = format!("s3://bucket/{}", unique("path"));
        let id = self.pg.insert_asset(&name, &uri, true).await;
        Asset { id, name, uri }
    }
}

/// The Execution API path of `key` of `asset`, addressed by its name.
pub fn by_name(asset: &Asset, key: &str) -> String {
    format!(
        "/execution/store/asset/by-name/value?name={}&key={}",
        enc(&asset.name),
        enc(key)
    )
}

/// The Execution API path of `key` of `asset`, addressed by its URI.
pub fn by_uri(asset: &Asset, key: &str) -> String {
    format!(
        "/execution/store/asset/by-uri/value?uri={}&key={}",
        enc(&asset.uri),
        enc(key)
    )
}
