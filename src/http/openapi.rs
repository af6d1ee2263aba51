//! The OpenAPI 3.1 document of the whole HTTP surface, served at `/openapi.json`.
//!
//! What the document says of an operation ([`Operation`]) and how it is rendered. The
//! operations themselves are the route table (`routes::table`), which builds the router
//! too; [`served`] records the paths the router was given, for `tests/it/openapi.rs`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::routing::{MethodFilter, MethodRouter};
use serde_json::{json, Map, Value};

use super::AppState;

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    /// Airflow's execution JWT.
    Execution,
    /// `AIRSTATE_ADMIN_TOKEN`.
    Admin,
    /// Airflow's own credentials (its UI's session or an API token); Airflow decides.
    Airflow,
}

/// What a successful reply carries.
#[derive(Clone, Copy)]
pub enum Reply {
    /// `{"value": <any JSON>}`, or 304 under `If-None-Match`.
    Value,
    /// 204 with an empty body.
    Empty,
    /// A bulk read: `{"values", "etags", "missing"}`, or a change stream.
    Bulk,
    /// An admin entry or a page of entries.
    Entry,
    Page,
    /// Airflow's Core REST API entry, and its `{"task_state_store" | "asset_state_store",
    /// "total_entries"}` collection.
    AirflowEntry,
    AirflowPage,
    /// `{"status": ...}`; `/ready` answers 503 when not ready.
    Status,
    Text,
    Document,
}

#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// `{"value", "expires_at"?}`.
    TaskPut,
    /// `{"value"}`.
    AssetPut,
    /// `{"value", "last_updated_by"?}`: an admin asset write naming its writer.
    AdminAssetPut,
    /// `{"value"?, "expires_at"?}`.
    Patch,
    /// `{"keys": [...]}`.
    Keys,
}

pub struct Operation {
    pub method: &'static str,
    /// The axum template (`{*key}` for a key that may hold `/`).
    pub path: &'static str,
    pub summary: &'static str,
    /// The `operationId`: written in the table, so it never changes with a path or summary.
    pub id: &'static str,
    /// Query parameters: (name, required, JSON schema type).
    pub query: &'static [(&'static str, bool, &'static str)],
    pub body: Body,
    pub reply: Reply,
    pub auth: Auth,
}

pub const ASSET_NAME_KEY: &[(&str, bool, &str)] =
    &[("name", true, "string"), ("key", true, "string")];
pub const ASSET_URI_KEY: &[(&str, bool, &str)] =
    &[("uri", true, "string"), ("key", true, "string")];
pub const ASSET_NAME: &[(&str, bool, &str)] = &[("name", true, "string")];
pub const ASSET_URI: &[(&str, bool, &str)] = &[("uri", true, "string")];
// `keys` may be left out only with `Accept: text/event-stream` (a change stream of every key).
pub const BULK_NAME: &[(&str, bool, &str)] = &[("name", true, "string"), ("keys", true, "string")];
pub const BULK_URI: &[(&str, bool, &str)] = &[("uri", true, "string"), ("keys", true, "string")];
pub const MAP_INDEX: &[(&str, bool, &str)] = &[("map_index", false, "integer")];
// Admin writes: `skip_value_limit` skips max_value_storage_bytes, as Airflow's Execution API does.
pub const TASK_WRITE: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("skip_value_limit", false, "boolean"),
];
pub const ASSET_NAME_WRITE: &[(&str, bool, &str)] = &[
    ("name", true, "string"),
    ("key", true, "string"),
    ("skip_value_limit", false, "boolean"),
];
pub const ASSET_URI_WRITE: &[(&str, bool, &str)] = &[
    ("uri", true, "string"),
    ("key", true, "string"),
    ("skip_value_limit", false, "boolean"),
];
pub const SKIP_VALUE_LIMIT: &[(&str, bool, &str)] = &[("skip_value_limit", false, "boolean")];
pub const TASK_LIST: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
pub const TASK_CLEAR: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("all_map_indices", false, "boolean"),
];
pub const ASSET_LIST_NAME: &[(&str, bool, &str)] = &[
    ("name", true, "string"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
pub const ASSET_LIST_URI: &[(&str, bool, &str)] = &[
    ("uri", true, "string"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
pub const ALL_MAP_INDICES: &[(&str, bool, &str)] = &[("all_map_indices", false, "boolean")];
pub const PAGING: &[(&str, bool, &str)] =
    &[("limit", false, "integer"), ("after", false, "string")];
pub const CORE_TASK_LIST: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("limit", false, "integer"),
    ("offset", false, "integer"),
];
pub const CORE_PAGE: &[(&str, bool, &str)] =
    &[("limit", false, "integer"), ("offset", false, "integer")];

/// One operation and the handler serving it: an entry of the route table
/// (`routes::table`).
pub struct Route {
    pub operation: Operation,
    pub handler: MethodRouter<Arc<AppState>>,
}

/// A [`Route`]: `handler` serves `method` on `path`; the rest is the operation's entry in
/// the document (see [`Operation`]).
macro_rules! route {
    ($method:literal, $path:expr, $handler:expr, $summary:literal, $id:literal, $query:expr, $body:ident, $reply:ident, $auth:ident) => {
        $crate::http::openapi::Route {
            handler: axum::routing::on($crate::http::openapi::method_filter($method), $handler),
            operation: $crate::http::openapi::Operation {
                method: $method,
                path: $path,
                summary: $summary,
                id: $id,
                query: $query,
                body: $crate::http::openapi::Body::$body,
                reply: $crate::http::openapi::Reply::$reply,
                auth: $crate::http::openapi::Auth::$auth,
            },
        }
    };
}
pub(crate) use route;

pub fn method_filter(method: &str) -> MethodFilter {
    match method {
        "get" => MethodFilter::GET,
        "put" => MethodFilter::PUT,
        "post" => MethodFilter::POST,
        "patch" => MethodFilter::PATCH,
        "delete" => MethodFilter::DELETE,
        other => panic!("no route method {other:?}"),
    }
}

/// `{*key}` (axum) is `{key}` in OpenAPI.
pub fn openapi_path(template: &str) -> String {
    template.replace("{*", "{")
}

/// Path templates registered with the router, recorded as it is built.
#[derive(Default)]
pub struct Served(Mutex<BTreeSet<String>>);

impl Served {
    pub fn record(&self, template: &str) {
        self.0.lock().unwrap().insert(template.to_owned());
    }

    pub fn paths(&self) -> BTreeSet<String> {
        self.0.lock().unwrap().clone()
    }
}

/// The paths every router built in this process served (for `tests/it/openapi.rs`).
pub fn served() -> &'static Served {
    static SERVED: std::sync::OnceLock<Served> = std::sync::OnceLock::new();
    SERVED.get_or_init(Served::default)
}

fn detail() -> Value {
    json!({"type": "object", "required": ["detail"], "properties": {"detail": {}}})
}

fn json_content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn entry_schema(task: bool) -> Value {
    let mut properties = json!({
        "value": {},
        "key": {"type": "string"},
        "updated_at": {"type": "string", "format": "date-time"},
    });
    if task {
        properties["expires_at"] = json!({"type": ["string", "null"], "format": "date-time"});
    } else {
        properties["last_updated_by"] = json!({"type": ["object", "null"]});
    }
    json!({"type": "object", "required": ["value", "key", "updated_at"], "properties": properties})
}

/// Airflow's writer record: `task` names its task instance, `watcher` and `api` nothing.
fn writer_schema() -> Value {
    let text = json!({"type": "string", "minLength": 1, "maxLength": 250});
    json!({"oneOf": [
        {"type": "null"},
        {"type": "object", "required": ["kind", "dag_id", "run_id", "task_id", "map_index"],
         "additionalProperties": false,
         "properties": {"kind": {"const": "task"}, "dag_id": text, "run_id": text,
                        "task_id": text, "map_index": {"type": "integer", "minimum": -1}}},
        {"type": "object", "required": ["kind"], "additionalProperties": false,
         "properties": {"kind": {"enum": ["watcher", "api"]}}},
    ]})
}

fn airflow_entry_schema(task: bool) -> Value {
    let mut schema = entry_schema(task);
    if !task {
        schema["properties"]["last_updated_by"] = json!({"type": ["object", "null"], "properties": {
            "kind": {"enum": ["task", "watcher", "api"]},
            "dag_id": {"type": ["string", "null"]}, "run_id": {"type": ["string", "null"]},
            "task_id": {"type": ["string", "null"]}, "map_index": {"type": ["integer", "null"]},
        }});
    }
    schema
}

fn value_body(expires: bool, value_required: bool) -> Value {
    let mut properties = json!({"value": {"not": {"type": "null"}}});
    if expires {
        properties["expires_at"] = json!({"type": ["string", "number", "null"]});
    }
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    if value_required {
        schema["required"] = json!(["value"]);
    }
    schema
}

fn success(op: &Operation) -> (String, Value) {
    let ok = |schema: Value| json!({"description": "OK", "content": json_content(schema)});
    match op.reply {
        Reply::Empty => ("204".into(), json!({"description": "Done; empty body"})),
        Reply::Value => (
            "200".into(),
            ok(json!({"type": "object", "required": ["value"], "properties": {"value": {}}})),
        ),
        Reply::Bulk => (
            "200".into(),
            json!({"description": "Values, ETags and missing keys; or a text/event-stream",
                   "content": {"application/json": {"schema": {"type": "object"}},
                               "text/event-stream": {"schema": {"type": "string"}}}}),
        ),
        Reply::Entry => ("200".into(), ok(entry_schema(op.path.contains("/dags/")))),
        Reply::Page => (
            "200".into(),
            ok(json!({
                "type": "object",
                "required": ["entries", "total_entries", "next_after"],
                "properties": {
                    "entries": {"type": "array", "items": entry_schema(op.path.contains("/dags/"))},
                    "total_entries": {"type": "integer"},
                    "next_after": {"type": ["string", "null"]},
                },
            })),
        ),
        Reply::AirflowEntry => (
            "200".into(),
            ok(airflow_entry_schema(op.path.contains("/dags/"))),
        ),
        Reply::AirflowPage => {
            let member = if op.path.contains("/dags/") {
                "task_state_store"
            } else {
                "asset_state_store"
            };
            let mut properties = json!({"total_entries": {"type": "integer"}});
            properties[member] = json!({"type": "array", "items": airflow_entry_schema(member == "task_state_store")});
            (
                "200".into(),
                ok(
                    json!({"type": "object", "required": [member, "total_entries"], "properties": properties}),
                ),
            )
        }
        Reply::Status => (
            "200".into(),
            ok(
                json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}),
            ),
        ),
        Reply::Text => (
            "200".into(),
            json!({"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        ),
        Reply::Document => ("200".into(), ok(json!({"type": "object"}))),
    }
}

/// Which conditional requests an operation takes (`super::conditional`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Conditional {
    None,
    /// A GET of one key: `ETag`, and 304 under `If-None-Match`.
    Read,
    /// A write or delete of one key: `If-Match` / `If-None-Match`, 412.
    Write,
}

fn conditional_kind(op: &Operation) -> Conditional {
    let one_key = op.path.ends_with("{*key}") || op.path.ends_with("/value");
    match (op.auth, op.method) {
        (Auth::Execution, "get") if one_key => Conditional::Read,
        (Auth::Execution, "put" | "delete") if one_key => Conditional::Write,
        _ => Conditional::None,
    }
}

/// The error statuses of an operation, each answered as `{"detail": ...}`.
fn error_statuses(op: &Operation, conditional: Conditional) -> Vec<u16> {
    if op.auth == Auth::None {
        return if op.path == "/ready" {
            vec![503]
        } else {
            vec![]
        };
    }
    // Empty keys are refused after authentication, before anything is looked up.
    if op.path.ends_with('/') {
        return vec![400, 401, 403, 422];
    }
    let mut codes = vec![400, 401, 403, 404, 422, 500, 503];
    if !matches!(op.body, Body::None) {
        codes.push(413);
    }
    if matches!(op.reply, Reply::Bulk) {
        // A change stream with change streams off, and a bulk read under If-None-Match.
        codes.extend([304, 406]);
    }
    if conditional == Conditional::Write || op.method == "patch" {
        codes.push(412);
    }
    if op.auth == Auth::Airflow {
        // Airflow's API server answers the access question.
        codes.extend([502, 504]);
    }
    codes.sort_unstable();
    codes
}

fn error_response(code: u16) -> Value {
    let description = match code {
        304 => "Not modified: If-None-Match names the current version",
        400 => "Bad request: a malformed header (If-Match, If-None-Match) or parameter",
        401 => "No credentials",
        403 => "Credentials refused, or not allowed for this resource",
        404 => "No such key, task instance or asset",
        406 => "A change stream was asked for, but change streams are off",
        412 => "Precondition failed: If-Match or If-None-Match does not hold",
        413 => "The request body is larger than AIRSTATE_MAX_BODY_BYTES",
        422 => "The request does not validate (Airflow's validation error list)",
        500 => "An internal error",
        502 => "Airflow's API server could not be reached",
        503 => "Redis or the metastore does not answer (or, for /ready, not ready)",
        504 => "Airflow's API server did not answer in time",
        _ => "An error",
    };
    if code == 304 {
        return json!({"description": description});
    }
    json!({"description": description, "content": json_content(detail())})
}

fn operation(op: &Operation) -> Value {
    let mut parameters = Vec::new();
    let path = openapi_path(op.path);
    for segment in path.split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let schema = match name {
                "task_instance_id" => json!({"type": "string", "format": "uuid"}),
                "asset_id" => json!({"type": "integer"}),
                "dag_id" | "run_id" | "task_id" => {
                    json!({"type": "string", "minLength": 1, "maxLength": 250})
                }
                _ => json!({"type": "string", "minLength": 1, "maxLength": 512}),
            };
            parameters
                .push(json!({"name": name, "in": "path", "required": true, "schema": schema}));
        }
    }
    for (name, required, kind) in op.query {
        parameters.push(
            json!({"name": name, "in": "query", "required": required, "schema": {"type": kind}}),
        );
    }
    let conditional = conditional_kind(op);
    if conditional != Conditional::None {
        for (name, description) in [
            ("If-Match", "Act only if the key's current ETag is listed (`*`: if it exists); else 412"),
            ("If-None-Match", "GET: 304 when the current ETag is listed. Writes: act only if it is not (`*`: only if the key does not exist); else 412"),
        ] {
            parameters.push(json!({"name": name, "in": "header", "required": false,
                                   "description": description, "schema": {"type": "string"}}));
        }
    }
    let mut responses = Map::new();
    let (status, mut reply) = success(op);
    let etag = json!({"ETag": {"$ref": "#/components/headers/ETag"}});
    match conditional {
        Conditional::Read => {
            reply["headers"] = etag.clone();
            responses.insert(status, reply);
            responses.insert(
                "304".into(),
                json!({"description": "Not modified: If-None-Match names the current ETag", "headers": etag}),
            );
        }
        Conditional::Write if op.method == "put" => {
            reply["headers"] = etag;
            responses.insert(status, reply);
        }
        _ if op.path.ends_with('/') => {}
        _ => {
            responses.insert(status, reply);
        }
    }
    for code in error_statuses(op, conditional) {
        responses.insert(
            code.to_string(),
            json!({"$ref": format!("#/components/responses/{code}")}),
        );
    }
    let tag = match (op.auth, op.path.contains("/ti/")) {
        (Auth::None, _) => "gateway",
        (Auth::Execution, true) => "task state",
        (Auth::Execution, false) => "asset state",
        (Auth::Admin, _) => "admin",
        (Auth::Airflow, _) => "core api",
    };
    let mut out = json!({
        "summary": op.summary,
        "operationId": op.id,
        "tags": [tag],
        "parameters": parameters,
        "responses": responses,
        "security": [],
    });
    match op.auth {
        Auth::None => {}
        Auth::Execution => out["security"] = json!([{"execution_jwt": []}]),
        Auth::Admin => out["security"] = json!([{"admin_token": []}]),
        Auth::Airflow => out["security"] = json!([{"airflow": []}]),
    }
    let body = match op.body {
        Body::None => None,
        Body::TaskPut => Some(value_body(true, true)),
        Body::AssetPut => Some(value_body(false, true)),
        Body::AdminAssetPut => {
            let mut schema = value_body(false, true);
            schema["properties"]["last_updated_by"] = writer_schema();
            Some(schema)
        }
        Body::Patch => Some(value_body(true, false)),
        Body::Keys => Some(json!({
            "type": "object", "required": ["keys"], "additionalProperties": false,
            "properties": {"keys": {
                "type": "array", "minItems": 1, "maxItems": 10000,
                "items": {"type": "string", "minLength": 1, "maxLength": 512},
            }},
        })),
    };
    if let Some(schema) = body {
        out["requestBody"] = json!({"required": true, "content": json_content(schema)});
    }
    out
}

fn security_scheme(name: &str) -> Value {
    match name {
        "execution_jwt" => json!({"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}),
        "admin_token" => {
            json!({"type": "http", "scheme": "bearer", "description": "AIRSTATE_ADMIN_TOKEN"})
        }
        _ => {
            json!({"type": "http", "scheme": "bearer", "description": "Airflow's own API token or UI session; Airflow's API server decides access"})
        }
    }
}

/// The document of `operations` (see `routes::document`).
pub fn document<'a>(operations: impl IntoIterator<Item = &'a Operation>) -> Value {
    let mut paths = Map::new();
    for op in operations {
        let item = paths
            .entry(openapi_path(op.path))
            .or_insert_with(|| json!({}));
        item[op.method] = operation(op);
    }
    let mut schemes = Map::new();
    let mut codes = BTreeSet::new();
    let mut tags = BTreeSet::new();
    for item in paths.values() {
        for op in item.as_object().into_iter().flat_map(|ops| ops.values()) {
            for requirement in op["security"].as_array().into_iter().flatten() {
                for name in requirement.as_object().into_iter().flat_map(|r| r.keys()) {
                    schemes.insert(name.clone(), security_scheme(name));
                }
            }
            for (code, response) in op["responses"].as_object().into_iter().flatten() {
                if response.get("$ref").is_some() {
                    codes.insert(code.parse::<u16>().unwrap_or_default());
                }
            }
            for tag in op["tags"].as_array().into_iter().flatten() {
                tags.insert(tag.as_str().unwrap_or_default().to_owned());
            }
        }
    }
    let responses: Map<String, Value> = codes
        .into_iter()
        .map(|code| (code.to_string(), error_response(code)))
        .collect();
    let tags: Vec<Value> = tags
        .into_iter()
        .map(|name| {
            let description = match name.as_str() {
                "gateway" => "Health, readiness, metrics and this document",
                "task state" => "Airflow's Execution API: a task instance's state keys (AIP-103), with airstate's bulk reads and change streams",
                "asset state" => "Airflow's Execution API: an asset's state keys (AIP-103), with airstate's bulk reads and change streams",
                "admin" => "airstate's admin API (AIRSTATE_ADMIN_TOKEN)",
                _ => "Airflow's Core REST API state routes, served here",
            };
            json!({"name": name, "description": description})
        })
        .collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "airstate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Apache Airflow's task-state and asset-state Execution API (AIP-103) served from Redis, with airstate's extensions and admin API.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/", "description": "The gateway that serves this document"}],
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": schemes,
            "headers": {"ETag": {
                "description": "The key's version, a strong entity tag: send it back in If-Match or If-None-Match",
                "schema": {"type": "string"},
            }},
            "responses": responses,
        },
    })
}
