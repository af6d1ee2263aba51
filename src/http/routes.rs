//! The route table: every operation of the HTTP surface, with its handler and what the
//! OpenAPI document says of it. The router and `/openapi.json` are both built from it, so
//! neither can list a route the other lacks.

use std::sync::Arc;

use axum::Router;
use serde_json::Value;

use super::openapi::{
    self, route, Auth, Route, ALL_MAP_INDICES, ASSET_NAME, ASSET_NAME_KEY, ASSET_URI,
    ASSET_URI_KEY, BULK_NAME, BULK_URI,
};
use super::{
    admin, asset, core_api, extensions, health, metrics, openapi_document, ready, task, AppState,
};

pub(crate) const TI_KEY: &str = "/execution/store/ti/{task_instance_id}/{*key}";
const TI_AIP103_KEY: &str = "/execution/state/ti/{task_instance_id}/{*key}";
pub(crate) const ASSET_AIP103_KEY: &str = "/execution/state/asset/{name}/{*key}";

/// Every operation: the gateway's own routes, the Execution API's (with airstate's
/// extensions and AIP-103's original paths), then the admin API's and Airflow's Core REST
/// API state routes.
pub fn table() -> Vec<Route> {
    let mut routes = vec![
        route!(
            "get",
            "/health",
            health,
            "Liveness",
            "getHealth",
            &[],
            None,
            Status,
            None
        ),
        route!(
            "get",
            "/ready",
            ready,
            "Readiness (503 when not ready)",
            "getReady",
            &[],
            None,
            Status,
            None
        ),
        route!(
            "get",
            "/metrics",
            metrics,
            "Prometheus metrics",
            "getMetrics",
            &[],
            None,
            Text,
            None
        ),
        route!(
            "get",
            "/openapi.json",
            openapi_document,
            "This document",
            "getOpenApiDocument",
            &[],
            None,
            Document,
            None
        ),
        // Airflow 3.3 Execution API.
        route!(
            "get",
            TI_KEY,
            task::get,
            "Get a task state key",
            "getTaskState",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            TI_KEY,
            task::put,
            "Set a task state key",
            "putTaskState",
            &[],
            TaskPut,
            Empty,
            Execution
        ),
        route!(
            "delete",
            TI_KEY,
            task::delete,
            "Delete a task state key",
            "deleteTaskState",
            &[],
            None,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/ti/{task_instance_id}",
            task::clear,
            "Clear the task instance's own map index",
            "clearTaskStates",
            &[],
            None,
            Empty,
            Execution
        ),
        route!(
            "get",
            "/execution/store/ti/{task_instance_id}",
            extensions::task_bulk_get,
            "Bulk read (airstate), or a change stream with Accept: text/event-stream",
            "getTaskStates",
            &[("keys", false, "string")],
            None,
            Bulk,
            Execution
        ),
        route!(
            "post",
            "/execution/store/ti/{task_instance_id}",
            extensions::task_bulk_post,
            "Bulk read of many keys (airstate)",
            "readTaskStates",
            &[],
            Keys,
            Bulk,
            Execution
        ),
        route!(
            "get",
            "/execution/store/asset/by-name/value",
            asset::get::<false>,
            "Get an asset state key",
            "getAssetStateByName",
            ASSET_NAME_KEY,
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            "/execution/store/asset/by-name/value",
            asset::put::<false>,
            "Set an asset state key",
            "putAssetStateByName",
            ASSET_NAME_KEY,
            AssetPut,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/asset/by-name/value",
            asset::delete::<false>,
            "Delete an asset state key",
            "deleteAssetStateByName",
            ASSET_NAME_KEY,
            None,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/asset/by-name/clear",
            asset::clear::<false>,
            "Clear an asset",
            "clearAssetStatesByName",
            ASSET_NAME,
            None,
            Empty,
            Execution
        ),
        route!(
            "get",
            "/execution/store/asset/by-uri/value",
            asset::get::<true>,
            "Get an asset state key",
            "getAssetStateByUri",
            ASSET_URI_KEY,
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            "/execution/store/asset/by-uri/value",
            asset::put::<true>,
            "Set an asset state key",
            "putAssetStateByUri",
            ASSET_URI_KEY,
            AssetPut,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/asset/by-uri/value",
            asset::delete::<true>,
            "Delete an asset state key",
            "deleteAssetStateByUri",
            ASSET_URI_KEY,
            None,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/asset/by-uri/clear",
            asset::clear::<true>,
            "Clear an asset",
            "clearAssetStatesByUri",
            ASSET_URI,
            None,
            Empty,
            Execution
        ),
        route!(
            "get",
            "/execution/store/asset/by-name/values",
            extensions::asset_bulk_get::<false>,
            "Bulk read or change stream (airstate)",
            "getAssetStatesByName",
            BULK_NAME,
            None,
            Bulk,
            Execution
        ),
        route!(
            "post",
            "/execution/store/asset/by-name/values",
            extensions::asset_bulk_post::<false>,
            "Bulk read (airstate)",
            "readAssetStatesByName",
            ASSET_NAME,
            Keys,
            Bulk,
            Execution
        ),
        route!(
            "get",
            "/execution/store/asset/by-uri/values",
            extensions::asset_bulk_get::<true>,
            "Bulk read or change stream (airstate)",
            "getAssetStatesByUri",
            BULK_URI,
            None,
            Bulk,
            Execution
        ),
        route!(
            "post",
            "/execution/store/asset/by-uri/values",
            extensions::asset_bulk_post::<true>,
            "Bulk read (airstate)",
            "readAssetStatesByUri",
            ASSET_URI,
            Keys,
            Bulk,
            Execution
        ),
        route!(
            "get",
            "/execution/store/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "getTaskEmptyKey",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            "/execution/store/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "putTaskEmptyKey",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "delete",
            "/execution/store/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "deleteTaskEmptyKey",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "get",
            "/execution/state/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "getTaskEmptyKeyAip103",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            "/execution/state/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "putTaskEmptyKeyAip103",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "delete",
            "/execution/state/ti/{task_instance_id}/",
            task::empty_key,
            "An empty key: always 422",
            "deleteTaskEmptyKeyAip103",
            &[],
            None,
            Value,
            Execution
        ),
        // AIP-103's original paths.
        route!(
            "get",
            TI_AIP103_KEY,
            task::get,
            "Get a task state key (AIP-103 path)",
            "getTaskStateAip103",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            TI_AIP103_KEY,
            task::put,
            "Set a task state key (AIP-103 path)",
            "putTaskStateAip103",
            &[],
            TaskPut,
            Empty,
            Execution
        ),
        route!(
            "delete",
            TI_AIP103_KEY,
            task::delete,
            "Delete a task state key (AIP-103 path)",
            "deleteTaskStateAip103",
            &[],
            None,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/state/ti/{task_instance_id}",
            task::aip103_clear,
            "Clear a map index, or all with all_map_indices (AIP-103 path)",
            "clearTaskStatesAip103",
            ALL_MAP_INDICES,
            None,
            Empty,
            Execution
        ),
        route!(
            "get",
            ASSET_AIP103_KEY,
            asset::aip103_get,
            "Get an asset state key (AIP-103 path)",
            "getAssetStateAip103",
            &[],
            None,
            Value,
            Execution
        ),
        route!(
            "put",
            ASSET_AIP103_KEY,
            asset::aip103_put,
            "Set an asset state key (AIP-103 path)",
            "putAssetStateAip103",
            &[],
            AssetPut,
            Empty,
            Execution
        ),
        route!(
            "delete",
            ASSET_AIP103_KEY,
            asset::aip103_delete,
            "Delete an asset state key (AIP-103 path)",
            "deleteAssetStateAip103",
            &[],
            None,
            Empty,
            Execution
        ),
        route!(
            "delete",
            "/execution/state/asset/{name}",
            asset::aip103_clear,
            "Clear an asset (AIP-103 path)",
            "clearAssetStatesAip103",
            &[],
            None,
            Empty,
            Execution
        ),
    ];
    routes.extend(admin::routes());
    routes.extend(core_api::routes());
    routes
}

/// The routers of [`table`], one per kind of caller, for `http::app` to put each
/// behind its layers; the admin one is empty unless the admin API is on, the Core API
/// one unless those routes are served here (else they are forwarded).
pub struct Routers {
    pub open: Router<Arc<AppState>>,
    pub execution: Router<Arc<AppState>>,
    pub admin: Router<Arc<AppState>>,
    pub core_api: Router<Arc<AppState>>,
}

pub fn routers(admin_api: bool, core_api: bool) -> Routers {
    let mut routers = Routers {
        open: Router::new(),
        execution: Router::new(),
        admin: Router::new(),
        core_api: Router::new(),
    };
    for Route { operation, handler } in table() {
        let group = match operation.auth {
            Auth::None => &mut routers.open,
            Auth::Execution => &mut routers.execution,
            Auth::Admin if admin_api => &mut routers.admin,
            Auth::Admin => continue,
            Auth::Airflow if core_api => &mut routers.core_api,
            Auth::Airflow => continue,
        };
        openapi::served().record(operation.path);
        // Routes of one path are merged by axum, method by method.
        *group = std::mem::take(group).route(operation.path, handler);
    }
    routers
}

/// The OpenAPI document of [`table`]: admin operations only when the admin API is on,
/// Core API ones only when served here (as [`routers`] builds them).
pub fn document(admin_api: bool, core_api: bool) -> Value {
    let table = table();
    openapi::document(
        table
            .iter()
            .map(|route| &route.operation)
            .filter(|operation| match operation.auth {
                Auth::Admin => admin_api,
                Auth::Airflow => core_api,
                Auth::None | Auth::Execution => true,
            }),
    )
}
