//! The OpenAPI 3.1 document of the whole HTTP surface, served at `/openapi.json`.
//!
//! It is built from [`operations`], and the router registers its paths through
//! [`Served`], so a test can compare the two: a route added to the router without a
//! line here (or the other way round) fails `tests/openapi.rs`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde_json::{json, Map, Value};

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
    /// Query parameters: (name, required, JSON schema type).
    pub query: &'static [(&'static str, bool, &'static str)],
    pub body: Body,
    pub reply: Reply,
    pub auth: Auth,
}

const ASSET_NAME_KEY: &[(&str, bool, &str)] = &[("name", true, "string"), ("key", true, "string")];
const ASSET_URI_KEY: &[(&str, bool, &str)] = &[("uri", true, "string"), ("key", true, "string")];
const ASSET_NAME: &[(&str, bool, &str)] = &[("name", true, "string")];
const ASSET_URI: &[(&str, bool, &str)] = &[("uri", true, "string")];
// `keys` may be left out only with `Accept: text/event-stream` (a change stream of every key).
const BULK_NAME: &[(&str, bool, &str)] = &[("name", true, "string"), ("keys", true, "string")];
const BULK_URI: &[(&str, bool, &str)] = &[("uri", true, "string"), ("keys", true, "string")];
const MAP_INDEX: &[(&str, bool, &str)] = &[("map_index", false, "integer")];
// Admin writes: `skip_value_limit` skips max_value_storage_bytes, as Airflow's Execution API does.
const TASK_WRITE: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("skip_value_limit", false, "boolean"),
];
const ASSET_NAME_WRITE: &[(&str, bool, &str)] = &[
    ("name", true, "string"),
    ("key", true, "string"),
    ("skip_value_limit", false, "boolean"),
];
const ASSET_URI_WRITE: &[(&str, bool, &str)] = &[
    ("uri", true, "string"),
    ("key", true, "string"),
    ("skip_value_limit", false, "boolean"),
];
const SKIP_VALUE_LIMIT: &[(&str, bool, &str)] = &[("skip_value_limit", false, "boolean")];
const TASK_LIST: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
const TASK_CLEAR: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("all_map_indices", false, "boolean"),
];
const ASSET_LIST_NAME: &[(&str, bool, &str)] = &[
    ("name", true, "string"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
const ASSET_LIST_URI: &[(&str, bool, &str)] = &[
    ("uri", true, "string"),
    ("limit", false, "integer"),
    ("after", false, "string"),
];
const ALL_MAP_INDICES: &[(&str, bool, &str)] = &[("all_map_indices", false, "boolean")];
const PAGING: &[(&str, bool, &str)] = &[("limit", false, "integer"), ("after", false, "string")];
const CORE_TASK_LIST: &[(&str, bool, &str)] = &[
    ("map_index", false, "integer"),
    ("limit", false, "integer"),
    ("offset", false, "integer"),
];
const CORE_PAGE: &[(&str, bool, &str)] =
    &[("limit", false, "integer"), ("offset", false, "integer")];
const CORE_TASK: &str =
    "/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store";
const CORE_TASK_KEY: &str =
    "/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store/{*key}";
const CORE_ASSET: &str = "/api/v2/assets/{asset_id}/state-store";
const CORE_ASSET_KEY: &str = "/api/v2/assets/{asset_id}/state-store/{*key}";

macro_rules! op {
    ($method:literal, $path:expr, $summary:literal, $query:expr, $body:ident, $reply:ident, $auth:ident) => {
        Operation {
            method: $method,
            path: $path,
            summary: $summary,
            query: $query,
            body: Body::$body,
            reply: Reply::$reply,
            auth: Auth::$auth,
        }
    };
}

const TI_KEY: &str = "/execution/store/ti/{task_instance_id}/{*key}";
const TI_SEED_KEY: &str = "/execution/state/ti/{task_instance_id}/{*key}";
const ADMIN_TASK: &str =
    "/admin/v1/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/state-store";
const ADMIN_TASK_KEY: &str =
    "/admin/v1/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/state-store/{*key}";
const ADMIN_ASSET_ID: &str = "/admin/v1/assets/by-id/{asset_id}/state-store";
const ADMIN_ASSET_ID_KEY: &str = "/admin/v1/assets/by-id/{asset_id}/state-store/{*key}";

/// Every operation the router serves (the admin ones only when enabled).
pub fn operations() -> Vec<Operation> {
    vec![
        op!("get", "/health", "Liveness", &[], None, Status, None),
        op!(
            "get",
            "/ready",
            "Readiness (503 when not ready)",
            &[],
            None,
            Status,
            None
        ),
        op!(
            "get",
            "/metrics",
            "Prometheus metrics",
            &[],
            None,
            Text,
            None
        ),
        op!(
            "get",
            "/openapi.json",
            "This document",
            &[],
            None,
            Document,
            None
        ),
        // Airflow 3.3 Execution API.
        op!(
            "get",
            TI_KEY,
            "Get a task state key",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            TI_KEY,
            "Set a task state key",
            &[],
            TaskPut,
            Empty,
            Execution
        ),
        op!(
            "delete",
            TI_KEY,
            "Delete a task state key",
            &[],
            None,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/ti/{task_instance_id}",
            "Clear the task instance's own map index",
            &[],
            None,
            Empty,
            Execution
        ),
        op!(
            "get",
            "/execution/store/ti/{task_instance_id}",
            "Bulk read (airstate), or a change stream with Accept: text/event-stream",
            &[("keys", false, "string")],
            None,
            Bulk,
            Execution
        ),
        op!(
            "post",
            "/execution/store/ti/{task_instance_id}",
            "Bulk read of many keys (airstate)",
            &[],
            Keys,
            Bulk,
            Execution
        ),
        op!(
            "get",
            "/execution/store/asset/by-name/value",
            "Get an asset state key",
            ASSET_NAME_KEY,
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            "/execution/store/asset/by-name/value",
            "Set an asset state key",
            ASSET_NAME_KEY,
            AssetPut,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/asset/by-name/value",
            "Delete an asset state key",
            ASSET_NAME_KEY,
            None,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/asset/by-name/clear",
            "Clear an asset",
            ASSET_NAME,
            None,
            Empty,
            Execution
        ),
        op!(
            "get",
            "/execution/store/asset/by-uri/value",
            "Get an asset state key",
            ASSET_URI_KEY,
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            "/execution/store/asset/by-uri/value",
            "Set an asset state key",
            ASSET_URI_KEY,
            AssetPut,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/asset/by-uri/value",
            "Delete an asset state key",
            ASSET_URI_KEY,
            None,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/asset/by-uri/clear",
            "Clear an asset",
            ASSET_URI,
            None,
            Empty,
            Execution
        ),
        op!(
            "get",
            "/execution/store/asset/by-name/values",
            "Bulk read or change stream (airstate)",
            BULK_NAME,
            None,
            Bulk,
            Execution
        ),
        op!(
            "post",
            "/execution/store/asset/by-name/values",
            "Bulk read (airstate)",
            ASSET_NAME,
            Keys,
            Bulk,
            Execution
        ),
        op!(
            "get",
            "/execution/store/asset/by-uri/values",
            "Bulk read or change stream (airstate)",
            BULK_URI,
            None,
            Bulk,
            Execution
        ),
        op!(
            "post",
            "/execution/store/asset/by-uri/values",
            "Bulk read (airstate)",
            ASSET_URI,
            Keys,
            Bulk,
            Execution
        ),
        op!(
            "get",
            "/execution/store/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            "/execution/store/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "delete",
            "/execution/store/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "get",
            "/execution/state/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            "/execution/state/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "delete",
            "/execution/state/ti/{task_instance_id}/",
            "An empty key: always 422",
            &[],
            None,
            Value,
            Execution
        ),
        // AIP-103's original paths.
        op!(
            "get",
            TI_SEED_KEY,
            "Get a task state key (AIP-103 path)",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            TI_SEED_KEY,
            "Set a task state key (AIP-103 path)",
            &[],
            TaskPut,
            Empty,
            Execution
        ),
        op!(
            "delete",
            TI_SEED_KEY,
            "Delete a task state key (AIP-103 path)",
            &[],
            None,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/state/ti/{task_instance_id}",
            "Clear a map index, or all with all_map_indices (AIP-103 path)",
            ALL_MAP_INDICES,
            None,
            Empty,
            Execution
        ),
        op!(
            "get",
            "/execution/state/asset/{name}/{*key}",
            "Get an asset state key (AIP-103 path)",
            &[],
            None,
            Value,
            Execution
        ),
        op!(
            "put",
            "/execution/state/asset/{name}/{*key}",
            "Set an asset state key (AIP-103 path)",
            &[],
            AssetPut,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/state/asset/{name}/{*key}",
            "Delete an asset state key (AIP-103 path)",
            &[],
            None,
            Empty,
            Execution
        ),
        op!(
            "delete",
            "/execution/state/asset/{name}",
            "Clear an asset (AIP-103 path)",
            &[],
            None,
            Empty,
            Execution
        ),
        // Admin API.
        op!(
            "get",
            ADMIN_TASK,
            "List a task scope's keys",
            TASK_LIST,
            None,
            Page,
            Admin
        ),
        op!(
            "delete",
            ADMIN_TASK,
            "Clear a map index, or every one",
            TASK_CLEAR,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            ADMIN_TASK_KEY,
            "Get a task state key",
            MAP_INDEX,
            None,
            Entry,
            Admin
        ),
        op!(
            "put",
            ADMIN_TASK_KEY,
            "Set a task state key",
            TASK_WRITE,
            TaskPut,
            Empty,
            Admin
        ),
        op!(
            "patch",
            ADMIN_TASK_KEY,
            "Change a task state key's value or expiry",
            TASK_WRITE,
            Patch,
            Empty,
            Admin
        ),
        op!(
            "delete",
            ADMIN_TASK_KEY,
            "Delete a task state key",
            MAP_INDEX,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            "/admin/v1/assets/by-name/state-store",
            "List an asset's keys",
            ASSET_LIST_NAME,
            None,
            Page,
            Admin
        ),
        op!(
            "delete",
            "/admin/v1/assets/by-name/state-store",
            "Clear an asset",
            ASSET_NAME,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            "/admin/v1/assets/by-name/state-store/value",
            "Get an asset state key",
            ASSET_NAME_KEY,
            None,
            Entry,
            Admin
        ),
        op!(
            "put",
            "/admin/v1/assets/by-name/state-store/value",
            "Set an asset state key",
            ASSET_NAME_WRITE,
            AdminAssetPut,
            Empty,
            Admin
        ),
        op!(
            "delete",
            "/admin/v1/assets/by-name/state-store/value",
            "Delete an asset state key",
            ASSET_NAME_KEY,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            "/admin/v1/assets/by-uri/state-store",
            "List an asset's keys",
            ASSET_LIST_URI,
            None,
            Page,
            Admin
        ),
        op!(
            "delete",
            "/admin/v1/assets/by-uri/state-store",
            "Clear an asset",
            ASSET_URI,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            "/admin/v1/assets/by-uri/state-store/value",
            "Get an asset state key",
            ASSET_URI_KEY,
            None,
            Entry,
            Admin
        ),
        op!(
            "put",
            "/admin/v1/assets/by-uri/state-store/value",
            "Set an asset state key",
            ASSET_URI_WRITE,
            AdminAssetPut,
            Empty,
            Admin
        ),
        op!(
            "delete",
            "/admin/v1/assets/by-uri/state-store/value",
            "Delete an asset state key",
            ASSET_URI_KEY,
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            ADMIN_ASSET_ID,
            "List an asset's keys, by Airflow's asset id",
            PAGING,
            None,
            Page,
            Admin
        ),
        op!(
            "delete",
            ADMIN_ASSET_ID,
            "Clear an asset, by Airflow's asset id",
            &[],
            None,
            Empty,
            Admin
        ),
        op!(
            "get",
            ADMIN_ASSET_ID_KEY,
            "Get an asset state key, by Airflow's asset id",
            &[],
            None,
            Entry,
            Admin
        ),
        op!(
            "put",
            ADMIN_ASSET_ID_KEY,
            "Set an asset state key (and its writer), by Airflow's asset id",
            SKIP_VALUE_LIMIT,
            AdminAssetPut,
            Empty,
            Admin
        ),
        op!(
            "delete",
            ADMIN_ASSET_ID_KEY,
            "Delete an asset state key, by Airflow's asset id",
            &[],
            None,
            Empty,
            Admin
        ),
    ]
}

/// Airflow's Core REST API state routes, served from the store in front of an upstream.
fn core_api_operations() -> Vec<Operation> {
    vec![
        op!(
            "get",
            CORE_TASK,
            "List a task instance's state (Airflow's Core REST API)",
            CORE_TASK_LIST,
            None,
            AirflowPage,
            Airflow
        ),
        op!(
            "delete",
            CORE_TASK,
            "Clear a task instance's state",
            TASK_CLEAR,
            None,
            Empty,
            Airflow
        ),
        op!(
            "get",
            CORE_TASK_KEY,
            "Get a task state key",
            MAP_INDEX,
            None,
            AirflowEntry,
            Airflow
        ),
        op!(
            "put",
            CORE_TASK_KEY,
            "Set a task state key",
            MAP_INDEX,
            TaskPut,
            Empty,
            Airflow
        ),
        op!(
            "patch",
            CORE_TASK_KEY,
            "Change the value of a task state key",
            MAP_INDEX,
            AssetPut,
            Document,
            Airflow
        ),
        op!(
            "delete",
            CORE_TASK_KEY,
            "Delete a task state key",
            MAP_INDEX,
            None,
            Empty,
            Airflow
        ),
        op!(
            "get",
            CORE_ASSET,
            "List an asset's state",
            CORE_PAGE,
            None,
            AirflowPage,
            Airflow
        ),
        op!(
            "delete",
            CORE_ASSET,
            "Clear an asset's state",
            &[],
            None,
            Empty,
            Airflow
        ),
        op!(
            "get",
            CORE_ASSET_KEY,
            "Get an asset state key",
            &[],
            None,
            AirflowEntry,
            Airflow
        ),
        op!(
            "put",
            CORE_ASSET_KEY,
            "Set an asset state key",
            &[],
            AssetPut,
            Empty,
            Airflow
        ),
        op!(
            "delete",
            CORE_ASSET_KEY,
            "Delete an asset state key",
            &[],
            None,
            Empty,
            Airflow
        ),
    ]
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

/// `Router::route`, recording the path template in [`served`].
pub trait RouteServed<S> {
    fn served(self, path: &str, method_router: axum::routing::MethodRouter<S>) -> Self;
}

impl<S: Clone + Send + Sync + 'static> RouteServed<S> for axum::Router<S> {
    fn served(self, path: &str, method_router: axum::routing::MethodRouter<S>) -> Self {
        served().record(path);
        self.route(path, method_router)
    }
}

/// The paths every router built in this process served (for `tests/openapi.rs`).
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
    let mut responses = Map::new();
    let (status, reply) = success(op);
    responses.insert(status, reply);
    if matches!(op.reply, Reply::Status) {
        responses.insert(
            "503".into(),
            json!({"description": "Not ready", "content": json_content(detail())}),
        );
    }
    if op.auth != Auth::None {
        if matches!(op.reply, Reply::Value | Reply::Bulk) {
            responses.insert(
                "304".into(),
                json!({"description": "Not modified (If-None-Match)"}),
            );
        }
        // Every error carries Airflow's `{"detail": ...}`: 400 (bad If-Match), 401, 403,
        // 404, 406 (change streams off), 412, 413, 422, 503.
        responses.insert(
            "default".into(),
            json!({"description": "An error, as {\"detail\": ...}", "content": json_content(detail())}),
        );
    }
    let mut out = json!({
        "summary": op.summary,
        "operationId": format!("{}_{}", op.method, path.trim_start_matches('/').replace(['/', '{', '}', '-', '.'], "_")),
        "parameters": parameters,
        "responses": responses,
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

/// The document; admin operations are listed only when the admin API is on, Airflow's
/// Core REST API state routes only when they are served here.
pub fn document(admin: bool, core_api: bool) -> Value {
    let mut paths = Map::new();
    let core = if core_api {
        core_api_operations()
    } else {
        Vec::new()
    };
    for op in operations().into_iter().chain(core) {
        if op.auth == Auth::Admin && !admin {
            continue;
        }
        let item = paths
            .entry(openapi_path(op.path))
            .or_insert_with(|| json!({}));
        item[op.method] = operation(&op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "airstate",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Apache Airflow's task-state and asset-state Execution API (AIP-103) served from Redis, with airstate's extensions and admin API.",
        },
        "paths": paths,
        "components": {"securitySchemes": {
            "execution_jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "admin_token": {"type": "http", "scheme": "bearer", "description": "AIRSTATE_ADMIN_TOKEN"},
            "airflow": {"type": "http", "scheme": "bearer", "description": "Airflow's own API token or UI session; Airflow's API server decides access"},
        }},
    })
}
