//! Wire parity with Airflow 3.3.2 (issue 14): each behaviour observed on Airflow's
//! api-server, or the deliberate difference the README's table lists.

use crate::gateway;

use gateway::{ti_path, Backend, Gateway};

const MIB: usize = 1 << 20;

/// A task PUT body of exactly `len` bytes: a string value padded to fit.
fn body_of_len(len: usize) -> String {
    let frame = r#"{"value": "", "expires_at": "2099-01-01T00:00:00+00:00"}"#.len();
    format!(
        r#"{{"value": "{}", "expires_at": "2099-01-01T00:00:00+00:00"}}"#,
        "x".repeat(len - frame)
    )
}

/// The default body cap takes a value of the documented maximum (1 MiB of JSON text) with
/// the envelope around it, and refuses a body one byte over the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_body_cap_fits_a_1_mib_value() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "big");
    let value = format!("\"{}\"", "v".repeat(MIB - 2));
    assert_eq!(value.len(), MIB);
    let body = format!(r#"{{"value": {value}, "expires_at": "2099-01-01T00:00:00+00:00"}}"#);
    let put = gw.put_text(&path, &ti.token, &body).await;
    assert_eq!(put.status, 204, "{put:?}");
    let got = gw.get(&path, &ti.token).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["value"].as_str().map(str::len), Some(MIB - 2));

    let cap = gw_cap();
    let at_cap = gw.put_text(&path, &ti.token, &body_of_len(cap)).await;
    assert_eq!(at_cap.status, 204, "{at_cap:?}");
    let over = gw.put_text(&path, &ti.token, &body_of_len(cap + 1)).await;
    assert_eq!(over.status, 413, "{over:?}");
}

fn gw_cap() -> usize {
    airstate::config::VARIABLES
        .iter()
        .find(|v| v.name == "AIRSTATE_MAX_BODY_BYTES")
        .map(|v| v.default.text().parse().unwrap())
        .unwrap()
}

/// Airflow's routes are one method each, and Starlette's 405 lists the methods of the
/// first route whose path matched; HEAD is no method of any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_not_allowed_is_airflows_405_with_its_allow() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let bearer = format!("Bearer {}", ti.token);
    let clear = format!("/execution/store/ti/{}", ti.id);
    let cases = [
        ("HEAD", ti_path(&ti, "k"), "GET"),
        ("POST", ti_path(&ti, "k"), "GET"),
        ("PATCH", ti_path(&ti, "k"), "GET"),
        ("GET", clear.clone(), "DELETE"),
        ("HEAD", clear.clone(), "DELETE"),
        (
            "POST",
            "/execution/store/asset/by-name/value?name=a&key=k".into(),
            "GET",
        ),
        (
            "GET",
            "/execution/store/asset/by-name/clear?name=a".into(),
            "DELETE",
        ),
        (
            "HEAD",
            "/execution/store/asset/by-uri/value?uri=a&key=k".into(),
            "GET",
        ),
    ];
    for (method, path, allow) in cases {
        let reply = gw
            .send_raw(method, &path, &[("authorization", &bearer)], "")
            .await;
        assert_eq!(reply.status, 405, "{method} {path}: {reply:?}");
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        if method != "HEAD" {
            assert_eq!(reply.text, r#"{"detail":"Method Not Allowed"}"#);
        }
    }
}

/// A 200 GET sent as Airflow's Task SDK sends it (httpx accepts gzip and deflate): the
/// answer's `content-encoding`, and its body, unzipped when it came gzipped (reqwest here
/// has no gzip feature, so the body arrives as sent).
async fn get_accepting_gzip(gw: &Gateway, path: &str, bearer: &str) -> (Option<String>, String) {
    use std::io::Read;
    let reply = gw
        .http
        .get(format!("{}{path}", gw.base))
        .header("authorization", bearer)
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["vary"], "Accept-Encoding");
    let encoding = reply
        .headers()
        .get("content-encoding")
        .map(|value| value.to_str().unwrap().to_owned());
    let bytes = reply.bytes().await.unwrap();
    let text = if encoding.as_deref() == Some("gzip") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        text
    } else {
        String::from_utf8(bytes.to_vec()).unwrap()
    };
    (encoding, text)
}

/// Airflow's API server gzips a response body when the client accepts gzip (airstate from
/// 1,024 bytes, Airflow's `minimum_size`: README, where airstate differs), and says
/// `vary: Accept-Encoding` on every response with a body; Cadwyn echoes the requested
/// `Airflow-API-Version` on every answer of the Execution API, refusals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_vary_and_the_version_echo() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let bearer = format!("Bearer {}", ti.token);
    let path = ti_path(&ti, "k");
    let value = format!("\"{}\"", "abc".repeat(700));
    assert_eq!(
        gw.put_text(&path, &ti.token, &format!(r#"{{"value": {value}}}"#))
            .await
            .status,
        204
    );

    let (encoding, text) = get_accepting_gzip(&gw, &path, &bearer).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(text, format!(r#"{{"value":{value}}}"#));

    // Under Airflow's `minimum_size` (1,024 bytes), even asked for: as it is, with `vary`.
    // `{"value":` and `}` are 10 bytes, the quotes 2 more.
    for (body_bytes, zipped) in [(1023, false), (1024, true)] {
        let edge_path = ti_path(&ti, &format!("edge{body_bytes}"));
        let body = format!(r#"{{"value":"{}"}}"#, "e".repeat(body_bytes - 12));
        assert_eq!(body.len(), body_bytes);
        assert_eq!(gw.put_text(&edge_path, &ti.token, &body).await.status, 204);
        let (encoding, text) = get_accepting_gzip(&gw, &edge_path, &bearer).await;
        let expected = zipped.then_some("gzip");
        assert_eq!(encoding.as_deref(), expected, "{body_bytes} bytes");
        assert_eq!(text, body);
    }

    // Not asked for: identity, still with `vary`; small bodies too.
    let plain = gw.get(&path, &ti.token).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    let missing = gw.get(&ti_path(&ti, "nope"), &ti.token).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("vary"), Some("Accept-Encoding"));
    // A 204 has no body, and no `vary`.
    let deleted = gw.delete(&ti_path(&ti, "nope"), &ti.token).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(deleted.header("vary"), None);

    let with_version = |version: &'static str, method: &'static str, path: String| {
        let bearer = bearer.clone();
        let gw = &gw;
        async move {
            gw.send_raw(
                method,
                &path,
                &[("authorization", &bearer), ("airflow-api-version", version)],
                "",
            )
            .await
        }
    };
    for (version, method, path, status) in [
        ("2026-04-06", "GET", path.clone(), 404),
        ("garbage", "GET", path.clone(), 422),
        ("2026-07-15", "POST", path.clone(), 405),
        (
            "2026-06-30",
            "GET",
            "/execution/no-such-route".to_owned(),
            404,
        ),
        ("2026-06-29", "POST", path.clone(), 404),
        ("2026-06-29", "HEAD", path.clone(), 404),
        // Airflow routes before it validates the version.
        ("garbage", "POST", path.clone(), 405),
    ] {
        let reply = with_version(version, method, path.clone()).await;
        assert_eq!(reply.status, status, "{version} {method} {path}: {reply:?}");
        assert_eq!(
            reply.header("airflow-api-version"),
            Some(version),
            "{version} {method} {path}"
        );
    }
    let unversioned = gw
        .send("GET", "/execution/no-such-route", Some(&ti.token), None)
        .await;
    assert_eq!(
        unversioned.header("airflow-api-version"),
        Some("2026-06-30")
    );
}

async fn status_with(gw: &Gateway, ti: &gateway::Ti, token: &str) -> (u16, String) {
    let reply = gw.get(&ti_path(ti, "k"), token).await;
    (reply.status, reply.text)
}

/// PyJWT's refusals: a token issued in the future beyond the leeway, and any `crit`
/// header; an `exp` that does not fit 64 bits is refused on every use (Airflow accepts
/// it: a deliberate difference).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_iat_crit_and_overflowing_exp_are_refused() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let invalid = (403, r#"{"detail":"Invalid auth token"}"#.to_owned());
    let with = |name: &str, value: serde_json::Value| {
        let mut claims = gateway::claims_for(ti.id);
        claims.insert(name.into(), value);
        gateway::sign(&claims)
    };
    let now = gateway::now();
    // Within the default 10 s leeway: served (the key is simply not set).
    assert_eq!(
        status_with(&gw, &ti, &with("iat", (now + 5).into()))
            .await
            .0,
        404
    );
    assert_eq!(
        status_with(&gw, &ti, &with("iat", (now + 60).into())).await,
        invalid
    );

    for exp in [
        serde_json::json!(9_223_372_036_854_775_808u64),
        serde_json::from_str("18446744073709551616").unwrap(),
        serde_json::json!(1e20),
    ] {
        let token = with("exp", exp.clone());
        for attempt in 0..2 {
            assert_eq!(
                status_with(&gw, &ti, &token).await,
                invalid,
                "exp {exp} #{attempt}"
            );
        }
    }

    for crit in [vec!["foo".to_owned()], vec![]] {
        let mut header = Header::new(Algorithm::HS512);
        header.crit = Some(crit.clone());
        let token = jsonwebtoken::encode(
            &header,
            &gateway::claims_for(ti.id),
            &EncodingKey::from_secret(gateway::SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            status_with(&gw, &ti, &token).await,
            invalid,
            "crit {crit:?}"
        );
    }
}

fn json_headers(bearer: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(bearer) = bearer {
        headers.push(("authorization", format!("Bearer {bearer}")));
    }
    headers
}

async fn send_json(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> gateway::Reply {
    let headers = json_headers(token);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    gw.send_raw(method, path, &headers, body).await
}

fn nested(n: usize) -> String {
    format!("{{\"value\": {}1{}}}", "[".repeat(n), "]".repeat(n))
}

/// FastAPI reads a JSON body before the auth dependency refuses the request: broken JSON
/// is a 422 (a 400 when nested past Python's decoder) with no token or another task's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_syntax_is_checked_before_auth() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let other = gw.task().await;
    let invalid = serde_json::json!({"detail": [{
        "type": "json_invalid", "loc": ["body", 1], "msg": "JSON decode error",
        "input": {}, "ctx": {"error": "Expecting property name enclosed in double quotes"}
    }]});
    let paths = [
        ti_path(&ti, "k"),
        "/execution/store/asset/by-name/value?name=a&key=k".to_owned(),
        "/execution/store/asset/by-uri/value?uri=a&key=k".to_owned(),
        format!("/execution/state/ti/{}/k", ti.id),
    ];
    for path in &paths {
        for token in [None, Some(other.token.as_str()), Some("not-a-jwt")] {
            let reply = send_json(&gw, "PUT", path, token, "{bad").await;
            assert_eq!(
                (reply.status, &reply.body),
                (422, &invalid),
                "{path} {token:?}"
            );
            let deep = send_json(&gw, "PUT", path, token, &nested(975)).await;
            assert_eq!(deep.status, 400, "{path} {token:?}: {deep:?}");
            assert_eq!(
                deep.text,
                r#"{"detail":"There was an error parsing the body"}"#
            );
        }
    }
    // Not declared as JSON: nothing is parsed before auth.
    let plain = gw
        .send_raw(
            "PUT",
            &ti_path(&ti, "k"),
            &[("content-type", "text/plain")],
            "{bad",
        )
        .await;
    assert_eq!(plain.status, 401);
    let bulk = send_json(
        &gw,
        "POST",
        &format!("/execution/store/ti/{}", ti.id),
        None,
        "[",
    )
    .await;
    assert_eq!(bulk.status, 422, "{bulk:?}");
}

/// pydantic validates a value to 254 levels (the innermost scalar counts), and names the
/// first element too deep; Python reads integers of up to 4,300 digits (its
/// `sys.int_max_str_digits`), and Airflow stores them; a longer one is FastAPI's 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_and_long_integers_as_airflow() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "deep");
    let ok = send_json(&gw, "PUT", &path, Some(&ti.token), &nested(253)).await;
    assert_eq!(ok.status, 204, "{ok:?}");
    let got = gw.get(&path, &ti.token).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text,
        format!("{{\"value\":{}1{}}}", "[".repeat(253), "]".repeat(253))
    );
    for n in [254, 600, 974] {
        let refused = send_json(&gw, "PUT", &path, Some(&ti.token), &nested(n)).await;
        assert_eq!(refused.status, 422, "{n}: {refused:?}");
        let issue = &refused.body["detail"][0];
        assert_eq!(issue["type"], "recursion_depth_exceeded", "{n}");
        assert_eq!(
            issue["msg"],
            "Recursion error - maximum validation depth exceeded"
        );
        let loc = issue["loc"].as_array().unwrap();
        assert_eq!(loc.len(), 2 + 2 * 254, "{n}");
        assert_eq!(
            loc[..4],
            [json!("body"), json!("value"), json!("list"), json!(0)]
        );
        assert!(issue.get("ctx").is_none());
    }
    let objects = format!(
        "{{\"value\": {}1{}}}",
        "{\"a\": ".repeat(254),
        "}".repeat(254)
    );
    let refused = send_json(&gw, "PUT", &path, Some(&ti.token), &objects).await;
    assert_eq!(
        refused.body["detail"][0]["loc"].as_array().unwrap()[2..4],
        [json!("dict"), json!("a")]
    );
    assert_eq!(refused.body["detail"][0]["input"], json!(1));
    let too_deep = send_json(&gw, "PUT", &path, Some(&ti.token), &nested(975)).await;
    assert_eq!(too_deep.status, 400);

    for digits in [310, 400, 4300] {
        let big = "7".repeat(digits);
        let put = send_json(
            &gw,
            "PUT",
            &path,
            Some(&ti.token),
            &format!(r#"{{"value": [-{big}]}}"#),
        )
        .await;
        assert_eq!(put.status, 204, "{digits}: {put:?}");
        let got = gw.get(&path, &ti.token).await;
        assert_eq!(got.text, format!(r#"{{"value":[-{big}]}}"#));
    }
    for body in [
        format!(r#"{{"value": [-{}]}}"#, "7".repeat(4301)),
        format!(r#"{{"value": 1, "x": {}}}"#, "7".repeat(5000)),
    ] {
        let put = send_json(&gw, "PUT", &path, Some(&ti.token), &body).await;
        assert_eq!(put.status, 400, "{put:?}");
        assert_eq!(
            put.text,
            r#"{"detail":"There was an error parsing the body"}"#
        );
    }
}
use serde_json::json;

/// Deliberate differences (README): Airflow stores a lone surrogate and then fails every
/// read with a 500, and its database refuses a key holding NUL (500); both are a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogates_and_nul_keys_are_422() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "s");
    for value in [
        r#""\ud800""#,
        r#"["ok", {"a": "x\udc00y"}]"#,
        r#""\ud800\u0041""#,
    ] {
        let reply = send_json(
            &gw,
            "PUT",
            &path,
            Some(&ti.token),
            &format!(r#"{{"value": {value}}}"#),
        )
        .await;
        assert_eq!(reply.status, 422, "{value}: {reply:?}");
        let issue = &reply.body["detail"][0];
        assert_eq!(issue["type"], "value_error");
        assert_eq!(issue["loc"], json!(["body", "value"]));
        assert!(
            issue["msg"]
                .as_str()
                .unwrap()
                .contains("lone UTF-16 surrogate"),
            "{issue}"
        );
    }
    assert_eq!(gw.get(&path, &ti.token).await.status, 404);
    // A proper pair is a character like any other.
    let pair = send_json(
        &gw,
        "PUT",
        &path,
        Some(&ti.token),
        r#"{"value": "\ud83d\ude00"}"#,
    )
    .await;
    assert_eq!(pair.status, 204);

    let nul = gw
        .put(&ti_path(&ti, "a%00b"), &ti.token, json!({"value": 1}))
        .await;
    assert_eq!(nul.status, 422, "{nul:?}");
    assert_eq!(nul.body["detail"][0]["loc"], json!(["path", "key"]));
    assert_eq!(nul.body["detail"][0]["input"], json!("a\u{0}b"));
    let asset_nul = gw
        .send(
            "GET",
            "/execution/store/asset/by-name/value?name=a&key=x%00",
            Some(&ti.token),
            None,
        )
        .await;
    assert_eq!(asset_nul.status, 422, "{asset_nul:?}");
    assert_eq!(asset_nul.body["detail"][0]["loc"], json!(["query", "key"]));
}

/// Python's words: json's messages with positions in characters, pydantic's datetime
/// errors, and `repr` quoting of a key in a not-found message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parser_messages_are_pythons() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    for (body, error, pos) in [
        (r#"{"value": }"#, "Expecting value", 10),
        // Positions count characters: "éé€" is three, seven bytes.
        (r#"{"value": "éé€" x}"#, "Expecting ',' delimiter", 16),
        (r#"{"value": [1,]}"#, "Expecting value", 13),
        (r#"{"value": "a\q"}"#, "Invalid \\escape", 12),
        (r#"{"value": 1} []"#, "Extra data", 13),
    ] {
        let reply = send_json(&gw, "PUT", &path, Some(&ti.token), body).await;
        assert_eq!(reply.status, 422, "{body}");
        let issue = &reply.body["detail"][0];
        assert_eq!(issue["type"], "json_invalid", "{body}");
        assert_eq!(issue["loc"], json!(["body", pos]), "{body}");
        assert_eq!(issue["ctx"]["error"], error, "{body}");
    }

    for (expires, error) in [
        ("soon", "input is too short"),
        (
            "2030-13-01T00:00:00Z",
            "month value is outside expected range of 1-12",
        ),
        (
            "2030-01-01T25:00:00Z",
            "unexpected extra characters at the end of the input",
        ),
    ] {
        let body = format!(r#"{{"value": 1, "expires_at": "{expires}"}}"#);
        let reply = send_json(&gw, "PUT", &path, Some(&ti.token), &body).await;
        let issue = &reply.body["detail"][0];
        assert_eq!(issue["type"], "datetime_from_date_parsing", "{expires}");
        assert_eq!(
            issue["msg"],
            format!("Input should be a valid datetime or date, {error}")
        );
        assert_eq!(issue["ctx"], json!({"error": error}));
    }

    let bearer = format!("Bearer {}", ti.token);
    let garbage = gw
        .send_raw(
            "GET",
            &path,
            &[
                ("authorization", &bearer),
                ("airflow-api-version", "garbage"),
            ],
            "",
        )
        .await;
    assert_eq!(
        garbage.body["detail"][0]["msg"],
        "Input should be a valid date or datetime, input is too short"
    );
    assert_eq!(
        garbage.body["detail"][0]["ctx"],
        json!({"error": "input is too short"})
    );

    for (key, repr) in [
        ("a%C2%A0b", r"'a\xa0b'"),
        ("%C2%85", r"'\x85'"),
        ("x%E2%80%A8", r"'x\u2028'"),
    ] {
        let reply = gw.get(&ti_path(&ti, key), &ti.token).await;
        assert_eq!(reply.status, 404);
        assert_eq!(
            reply.body["detail"]["message"],
            format!("Task state store key {repr} not found")
        );
    }
}

/// The README's decision on the byte form: the exact text received comes back, not
/// Python's re-rendering (`3.14`, `100.0`, `1e+16`, `{"a":1}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_keep_their_exact_text() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "exact");
    for value in [
        "3.140",
        "1E2",
        "1e16",
        r#"{"a": 1,  "b" : [ 1 ]}"#,
        r#""caf\u00e9 \/""#,
        "0.1000000000000000055511",
    ] {
        let put = send_json(
            &gw,
            "PUT",
            &path,
            Some(&ti.token),
            &format!(r#"{{"value": {value}}}"#),
        )
        .await;
        assert_eq!(put.status, 204, "{value}");
        let got = gw.get(&path, &ti.token).await;
        assert_eq!(got.text, format!(r#"{{"value":{value}}}"#));
    }
}
