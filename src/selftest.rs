//! `airstate selftest`: the chart's `helm test` hook, run from the gateway's own image
//! (distroless: no shell, no curl). It checks a running gateway from outside, as a worker
//! would: `/ready`, then a state round trip with a token it mints from the same signing
//! configuration the gateway trusts.

use std::time::Duration;

use airstate::config::{Config, IdentityMode};
use serde_json::{json, Map, Value};

/// The key the round trip writes, reads and deletes.
const KEY: &str = "airstate-selftest";

struct Reply {
    status: u16,
    body: String,
}

fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Reply, String> {
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => agent.run(
            request
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .map_err(|e| e.to_string())?,
        ),
        None => agent.run(request.body(()).map_err(|e| e.to_string())?),
    };
    let mut response = result.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    Ok(Reply { status, body })
}

fn expect(reply: &Reply, status: u16, what: &str) -> Result<(), String> {
    if reply.status == status {
        Ok(())
    } else {
        Err(format!(
            "{what}: expected {status}, got {}: {}",
            reply.status, reply.body
        ))
    }
}

/// Runs the checks against the gateway at `base`; a one-line summary, or what failed.
pub fn run(base: &str, config: &Config, timeout: Duration) -> Result<String, String> {
    let base = base.trim_end_matches('/');
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let ready = call(&agent, "GET", &format!("{base}/ready"), None, None)?;
    expect(&ready, 200, "GET /ready")?;
    // A degraded replica stays in the Service (README, "Readiness"), but it cannot
    // pass a state round trip: say which dependency is missing rather than the PUT's 503.
    let readiness: Value = serde_json::from_str(&ready.body).unwrap_or_default();
    if readiness["status"] != "ready" {
        return Err(format!("GET /ready: {}", ready.body));
    }

    // Trusting a JWKS only, this environment holds no key to sign with.
    if config.auth.secret.is_none() && config.auth.private_key_path.is_none() {
        return Ok(format!(
            "{base}: ready; no signing key here (JWKS trust only), so no round trip"
        ));
    }
    // A task of its own, so the round trip never touches a real task's state.
    let sub = uuid::Uuid::now_v7();
    let mut claims = Map::new();
    claims.insert("sub".into(), sub.to_string().into());
    claims.insert("dag_id".into(), "airstate-selftest".into());
    claims.insert("run_id".into(), format!("selftest__{sub}").into());
    claims.insert("task_id".into(), "selftest".into());
    let token = airstate::auth::Authenticator::new(&config.auth)
        .and_then(|auth| auth.mint(claims, Duration::from_secs(120)))
        .map_err(|e| format!("minting the test token: {e}"))?;
    let url = format!("{base}/execution/store/ti/{sub}/{KEY}");
    let token = Some(token.as_str());
    match config.identity {
        IdentityMode::Claims => {
            let nonce = uuid::Uuid::new_v4().to_string();
            let put = call(&agent, "PUT", &url, token, Some(&json!({"value": nonce})))?;
            expect(&put, 204, "PUT")?;
            let got = call(&agent, "GET", &url, token, None)?;
            expect(&got, 200, "GET")?;
            let value: Value = serde_json::from_str(&got.body).unwrap_or_default();
            if value["value"] != Value::String(nonce) {
                return Err(format!("GET returned {} instead of what was PUT", got.body));
            }
            expect(&call(&agent, "DELETE", &url, token, None)?, 204, "DELETE")?;
            expect(
                &call(&agent, "GET", &url, token, None)?,
                404,
                "GET after DELETE",
            )?;
            Ok(format!(
                "{base}: ready; state round trip (PUT, GET, DELETE, GET) passed"
            ))
        }
        // Without a task instance row the gateway must refuse the write; that refusal
        // still proves the token is trusted and Airflow's metastore answered.
        IdentityMode::Metastore => {
            let put = call(&agent, "PUT", &url, token, Some(&json!({"value": 1})))?;
            if put.status == 401 || put.status == 403 || put.status >= 500 {
                return Err(format!("PUT: {}: {}", put.status, put.body));
            }
            if put.status == 204 {
                return Err("PUT for a task instance Airflow does not have was accepted".into());
            }
            Ok(format!(
                "{base}: ready; token trusted and the metastore consulted (a task Airflow \
                 does not have: {}); no state written",
                put.status
            ))
        }
    }
}
