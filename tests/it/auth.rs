//! Authentication and Airflow's request conventions: 401 vs 403, token types, `ti:self`,
//! every key mode (secret, JWKS file and URL, private key), token refresh, the API
//! version header and correlation ids.

use crate::gateway;

use std::path::Path;
use std::process::Command;

use gateway::{claims_for, now, sign, sign_with, ti_path, Backend, Gateway, SECRET};
use jsonwebtoken::jwk::{Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};
use uuid::Uuid;

const INVALID: &str = "Invalid auth token";

async fn status_and_detail(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, Value) {
    let reply = gw.send("GET", path, token, None).await;
    (reply.status, reply.body["detail"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_foreign_scheme_is_401() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    assert_eq!(
        status_and_detail(&gw, &path, None).await,
        (401, json!("Missing auth token"))
    );
    let basic = gw
        .send_raw("GET", &path, &[("authorization", "Basic dXNlcjpwYXNz")], "")
        .await;
    assert_eq!(basic.status, 401);
    let empty = gw
        .send_raw("GET", &path, &[("authorization", "Bearer ")], "")
        .await;
    assert_eq!(empty.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_are_403_without_echo() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let good = claims_for(ti.id);
    let without = |claim: &str| {
        let mut c = good.clone();
        c.remove(claim);
        c
    };
    let with = |claim: &str, value: Value| {
        let mut c = good.clone();
        c.insert(claim.into(), value);
        c
    };
    let none_alg = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&good).unwrap())
        )
    };
    let cases: Vec<(&str, String)> = vec![
        ("garbage", "not-a-jwt".into()),
        (
            "wrong secret",
            sign_with(Algorithm::HS512, b"other-secret", &good),
        ),
        (
            "HS256 while HS512 is configured",
            sign_with(Algorithm::HS256, SECRET.as_bytes(), &good),
        ),
        ("alg none", none_alg),
        ("expired past leeway", sign(&with("exp", json!(now() - 30)))),
        ("not yet valid", sign(&with("nbf", json!(now() + 60)))),
        (
            "wrong audience",
            sign(&with("aud", json!("urn:someone-else"))),
        ),
        ("no audience", sign(&without("aud"))),
        ("no exp", sign(&without("exp"))),
        ("no iat", sign(&without("iat"))),
        ("no sub", sign(&without("sub"))),
        ("sub not a UUID", sign(&with("sub", json!("task-1")))),
    ];
    for (name, token) in cases {
        let reply = gw.send("GET", &path, Some(&token), None).await;
        assert_eq!(reply.status, 403, "{name}: {reply:?}");
        assert_eq!(reply.body, json!({"detail": INVALID}), "{name}");
        assert!(!reply.text.contains(&token), "{name}: token echoed");
    }
    // Within the 10 s leeway an expired token still works (and is refreshed).
    let lenient = gw
        .send(
            "GET",
            &path,
            Some(&sign(&with("exp", json!(now() - 5)))),
            None,
        )
        .await;
    assert_eq!(lenient.status, 404, "{lenient:?}");
    assert!(lenient.header("refreshed-api-token").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_type_and_subject_rules() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let mut workload = claims_for(ti.id);
    workload.insert("scope".into(), json!("workload"));
    assert_eq!(
        status_and_detail(&gw, &path, Some(&sign(&workload))).await,
        (
            403,
            json!("Token type 'workload' not allowed for this endpoint. Allowed types: execution")
        )
    );
    let mut odd_scope = claims_for(ti.id);
    odd_scope.insert("scope".into(), json!("ti:self"));
    let (status, detail) = status_and_detail(&gw, &path, Some(&sign(&odd_scope))).await;
    assert_eq!(status, 403);
    assert!(
        detail.as_str().unwrap().starts_with("Invalid auth token: "),
        "{detail}"
    );

    let mismatch = json!("Token subject does not match task instance ID");
    let other = gateway::token_for(Uuid::new_v4());
    assert_eq!(
        status_and_detail(&gw, &path, Some(&other)).await,
        (403, mismatch.clone())
    );
    let upper = format!("/execution/store/ti/{}/k", ti.id.to_string().to_uppercase());
    assert_eq!(
        status_and_detail(&gw, &upper, Some(&ti.token)).await,
        (403, mismatch.clone())
    );
    let not_uuid = "/execution/store/ti/not-a-uuid/k";
    assert_eq!(
        status_and_detail(&gw, not_uuid, Some(&ti.token)).await,
        (403, mismatch.clone())
    );
    // Auth runs before the body is looked at: a bad body with a wrong token is 403.
    let reply = gw.put(&path, &other, json!({"nonsense": true})).await;
    assert_eq!(reply.status, 403);
    // An upper-case subject in the token is fine: it is compared in canonical form.
    let mut upper_sub = claims_for(ti.id);
    upper_sub.insert("sub".into(), json!(ti.id.to_string().to_uppercase()));
    assert_eq!(
        status_and_detail(&gw, &path, Some(&sign(&upper_sub)))
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshed_token_follows_airflows_rule() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    // Plenty of life left: no refresh.
    let fresh = gw.get(&path, &ti.token).await;
    assert!(fresh.header("refreshed-api-token").is_none());
    // 600 s token with 100 s left (<= 20 % of 600): refreshed, on a 404 too.
    let mut aging = claims_for(ti.id);
    aging.insert("iat".into(), json!(now() - 500));
    aging.insert("exp".into(), json!(now() + 100));
    aging.insert("custom".into(), json!("kept"));
    let reply = gw.get(&path, &sign(&aging)).await;
    assert_eq!(reply.status, 404);
    let refreshed = reply
        .header("refreshed-api-token")
        .expect("refreshed token");
    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS512);
    validation.set_audience(&[gateway::AUDIENCE]);
    let decoded = jsonwebtoken::decode::<Map<String, Value>>(
        refreshed,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("refreshed token validates")
    .claims;
    assert_eq!(decoded["sub"], json!(ti.id.to_string()));
    assert_eq!(decoded["custom"], json!("kept"));
    assert_ne!(decoded["jti"], aging["jti"]);
    let exp = decoded["exp"].as_i64().unwrap();
    assert!((exp - (now() + 600)).abs() <= 5, "exp {exp}");
    // The refreshed token works.
    assert_eq!(gw.get(&path, refreshed).await.status, 404);
    // 30 s floor: a one-minute token with 25 s left is refreshed.
    let mut short = claims_for(ti.id);
    short.insert("iat".into(), json!(now() - 35));
    short.insert("exp".into(), json!(now() + 25));
    assert!(gw
        .get(&path, &sign(&short))
        .await
        .header("refreshed-api-token")
        .is_some());
    // Workload tokens are never refreshed.
    let mut workload = aging.clone();
    workload.insert("scope".into(), json!("workload"));
    let reply = gw.get(&path, &sign(&workload)).await;
    assert_eq!(reply.status, 403);
    assert!(reply.header("refreshed-api-token").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_list() {
    let gw = Gateway::start_with(
        Backend::Memory,
        &[
            ("AIRFLOW__API_AUTH__JWT_ISSUER", "airflow-test"),
            ("AIRFLOW__EXECUTION_API__JWT_AUDIENCE", "aud-one,aud-two"),
        ],
    )
    .await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let mut claims = claims_for(ti.id);
    claims.insert("aud".into(), json!("aud-two"));
    assert_eq!(gw.get(&path, &sign(&claims)).await.status, 403, "no iss");
    claims.insert("iss".into(), json!("someone-else"));
    assert_eq!(gw.get(&path, &sign(&claims)).await.status, 403, "wrong iss");
    claims.insert("iss".into(), json!("airflow-test"));
    assert_eq!(gw.get(&path, &sign(&claims)).await.status, 404, "accepted");
    claims.insert("aud".into(), json!(gateway::AUDIENCE));
    assert_eq!(
        gw.get(&path, &sign(&claims)).await.status,
        403,
        "default aud not listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_version_header_and_correlation_id() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let bearer = format!("Bearer {}", ti.token);
    let ask = |version: Option<&'static str>| {
        let mut headers = vec![
            ("authorization", bearer.as_str()),
            ("correlation-id", "corr-123"),
        ];
        if let Some(v) = version {
            headers.push(("airflow-api-version", v));
        }
        let gw = &gw;
        let path = path.clone();
        async move { gw.send_raw("GET", &path, &headers, "").await }
    };
    let latest = ask(None).await;
    assert_eq!(latest.status, 404);
    assert_eq!(latest.header("airflow-api-version"), Some("2026-06-30"));
    assert_eq!(latest.header("correlation-id"), Some("corr-123"));
    let newer = ask(Some("2099-01-01")).await;
    assert_eq!(newer.status, 404);
    assert_eq!(newer.body["detail"]["reason"], json!("not_found"));
    assert_eq!(newer.header("airflow-api-version"), Some("2099-01-01"));
    let older = ask(Some("2026-06-29")).await;
    assert_eq!(older.status, 404);
    assert_eq!(older.body, json!({"detail": "Not Found"}));
    let malformed = ask(Some("garbage")).await;
    assert_eq!(malformed.status, 422);
    assert_eq!(
        malformed.body["detail"][0]["loc"],
        json!(["header", "Airflow-API-Version"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods() {
    let gw = Gateway::start(Backend::Memory).await;
    let ti = gw.task().await;
    let nowhere = gw.get("/execution/nowhere", &ti.token).await;
    assert_eq!(
        (nowhere.status, nowhere.body),
        (404, json!({"detail": "Not Found"}))
    );
    let post = gw
        .send("POST", &ti_path(&ti, "k"), Some(&ti.token), None)
        .await;
    assert_eq!(
        (post.status, post.body),
        (405, json!({"detail": "Method Not Allowed"}))
    );
    let get_clear = gw
        .get(&format!("/execution/store/ti/{}", ti.id), &ti.token)
        .await;
    assert_eq!(get_clear.status, 405);
}

// --- public-key modes -------------------------------------------------------------------

/// Generates a private key with the openssl CLI (PKCS#8 PEM).
fn generate_key(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let status = Command::new("openssl")
        .args(["genpkey", "-out"])
        .arg(&path)
        .args(args)
        .status()
        .expect("openssl");
    assert!(status.success());
    std::fs::read(path).unwrap()
}

struct KeyPair {
    encoding: EncodingKey,
    algorithm: Algorithm,
    kid: String,
    public: Jwk,
}

fn key_pair(pem: &[u8], algorithm: Algorithm, kid: &str) -> KeyPair {
    let encoding = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_ed_pem(pem),
    }
    .unwrap();
    let mut public = Jwk::from_encoding_key(&encoding, algorithm).unwrap();
    public.common.key_id = Some(kid.to_owned());
    KeyPair {
        encoding,
        algorithm,
        kid: kid.to_owned(),
        public,
    }
}

fn sign_pair(pair: &KeyPair, kid: Option<&str>, claims: &Map<String, Value>) -> String {
    let mut header = Header::new(pair.algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &pair.encoding).unwrap()
}

fn test_pairs(dir: &Path) -> Vec<KeyPair> {
    vec![
        key_pair(
            &generate_key(
                dir,
                "rsa.pem",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            ),
            Algorithm::RS256,
            "rsa-1",
        ),
        key_pair(
            &generate_key(
                dir,
                "ec.pem",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            ),
            Algorithm::ES256,
            "ec-1",
        ),
        key_pair(
            &generate_key(dir, "ed.pem", &["-algorithm", "ed25519"]),
            Algorithm::EdDSA,
            "ed-1",
        ),
    ]
}

async fn assert_public_key_rules(gw: &Gateway, pairs: &[KeyPair]) {
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let claims = claims_for(ti.id);
    for pair in pairs {
        let name = &pair.kid;
        assert_eq!(
            gw.get(&path, &sign_pair(pair, Some(&pair.kid), &claims))
                .await
                .status,
            404,
            "{name}"
        );
        assert_eq!(
            gw.get(&path, &sign_pair(pair, None, &claims)).await.status,
            403,
            "{name} without kid"
        );
        assert_eq!(
            gw.get(&path, &sign_pair(pair, Some("unknown"), &claims))
                .await
                .status,
            403,
            "{name} unknown kid"
        );
    }
    let a = &pairs[0];
    // Another key's kid: the signature does not verify.
    if let Some(b) = pairs.get(1) {
        let crossed = sign_pair(b, Some(&a.kid), &claims);
        assert_eq!(gw.get(&path, &crossed).await.status, 403);
    }
    // HMAC "signed" with the public key's text (algorithm confusion) is refused.
    let public_text = serde_json::to_string(&a.public).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(a.kid.clone());
    let confused = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(public_text.as_bytes()),
    )
    .unwrap();
    assert_eq!(gw.get(&path, &confused).await.status, 403);
    // And the shared secret is not accepted in this mode.
    assert_eq!(gw.get(&path, &ti.token).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_with_rsa_ec_and_eddsa_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = test_pairs(dir.path());
    let jwks = JwkSet {
        keys: pairs.iter().map(|p| p.public.clone()).collect(),
    };
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, serde_json::to_vec(&jwks).unwrap()).unwrap();
    let gw = Gateway::start_with(
        Backend::Memory,
        &[
            (
                "AIRFLOW__API_AUTH__TRUSTED_JWKS_URL",
                jwks_path.to_str().unwrap(),
            ),
            // JWKS wins over the secret, which must then be ignored.
            ("AIRFLOW__API_AUTH__JWT_SECRET", SECRET),
        ],
    )
    .await;
    assert_public_key_rules(&gw, &pairs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_is_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = test_pairs(dir.path());
    let body = serde_json::to_string(&JwkSet {
        keys: pairs.iter().map(|p| p.public.clone()).collect(),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let jwks_server = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || async move { body }),
        );
        axum::serve(listener, app).await.unwrap();
    });
    let gw = Gateway::start_with(
        Backend::Memory,
        &[("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &url)],
    )
    .await;
    assert_public_key_rules(&gw, &pairs).await;
    jwks_server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_mode_trusts_its_public_key_under_the_thumbprint() {
    let dir = tempfile::tempdir().unwrap();
    let pem = generate_key(dir.path(), "signing.pem", &["-algorithm", "ed25519"]);
    let key_path = dir.path().join("signing.pem");
    let mut pair = key_pair(&pem, Algorithm::EdDSA, "");
    pair.public.common.key_id = None;
    let thumbprint = pair.public.thumbprint(ThumbprintHash::SHA256).unwrap();
    pair.kid = thumbprint.clone();
    let gw = Gateway::start_with(
        Backend::Memory,
        &[(
            "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
            key_path.to_str().unwrap(),
        )],
    )
    .await;
    assert_public_key_rules(&gw, std::slice::from_ref(&pair)).await;
    // Holding the private key, the gateway refreshes tokens, signed so that it accepts them.
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let mut aging = claims_for(ti.id);
    aging.insert("exp".into(), json!(now() + 20));
    let reply = gw
        .get(&path, &sign_pair(&pair, Some(&thumbprint), &aging))
        .await;
    let refreshed = reply.header("refreshed-api-token").expect("refreshed");
    let header = jsonwebtoken::decode_header(refreshed).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(thumbprint.as_str()));
    assert_eq!(gw.get(&path, refreshed).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_is_reread_and_a_broken_refresh_keeps_the_old_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = test_pairs(dir.path());
    let (old, new) = (&pairs[0], &pairs[2]);
    let jwks_path = dir.path().join("jwks.json");
    let write = |keys: &[&KeyPair]| {
        let set = JwkSet {
            keys: keys.iter().map(|p| p.public.clone()).collect(),
        };
        std::fs::write(&jwks_path, serde_json::to_vec(&set).unwrap()).unwrap();
    };
    write(&[old]);
    let gw = Gateway::start_with(
        Backend::Memory,
        &[
            (
                "AIRFLOW__API_AUTH__TRUSTED_JWKS_URL",
                jwks_path.to_str().unwrap(),
            ),
            ("AIRSTATE_JWKS_REFRESH_SECONDS", "1"),
        ],
    )
    .await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let claims = claims_for(ti.id);
    let with_new = sign_pair(new, Some(&new.kid), &claims);
    let with_old = sign_pair(old, Some(&old.kid), &claims);
    assert_eq!(gw.get(&path, &with_new).await.status, 403);
    // Airflow rotates its signing key: the gateway picks the new one up.
    write(&[old, new]);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(gw.get(&path, &with_new).await.status, 404);
    // A JWKS outage must not lock every worker out.
    std::fs::write(&jwks_path, b"not json").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(gw.get(&path, &with_old).await.status, 404);
    assert_eq!(gw.get(&path, &with_new).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_token_still_expires_on_time() {
    let gw = Gateway::start_with(Backend::Memory, &[("AIRFLOW__API_AUTH__JWT_LEEWAY", "0")]).await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let mut short = claims_for(ti.id);
    short.insert("exp".into(), json!(now() + 2));
    let token = sign(&short);
    // Verified once, then served from the verified-token cache...
    assert_eq!(gw.get(&path, &token).await.status, 404);
    assert_eq!(gw.get(&path, &token).await.status, 404);
    // ...but never past its exp.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let expired = gw.get(&path, &token).await;
    assert_eq!(
        (expired.status, expired.body),
        (403, json!({"detail": INVALID}))
    );
}

/// A JWKS served over HTTP that can be replaced, and counts how often it is fetched.
struct JwksServer {
    url: String,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[&KeyPair]) -> JwksServer {
        let body = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let (served, counted) = (body.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/jwks.json",
                axum::routing::get(move || async move {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    served.lock().unwrap().clone()
                }),
            );
            axum::serve(listener, app).await.unwrap();
        });
        let server = JwksServer {
            url,
            body,
            fetches,
            task,
        };
        server.serve(keys);
        server
    }

    fn serve(&self, keys: &[&KeyPair]) {
        *self.body.lock().unwrap() = serde_json::to_string(&JwkSet {
            keys: keys.iter().map(|p| p.public.clone()).collect(),
        })
        .unwrap();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_to_the_jwks_is_trusted_at_once_and_unknown_kids_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = test_pairs(dir.path());
    let (old, new) = (&pairs[0], &pairs[2]);
    let jwks = JwksServer::start(&[old]).await;
    // The periodic re-read (300 s by default) plays no part here.
    let gw = Gateway::start_with(
        Backend::Memory,
        &[("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &jwks.url)],
    )
    .await;
    assert_eq!(jwks.fetches(), 1, "read once at startup");
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let claims = claims_for(ti.id);

    // Airflow starts signing with a new key: the first token naming it is accepted.
    jwks.serve(&[old, new]);
    let with_new = sign_pair(new, Some(&new.kid), &claims);
    assert_eq!(gw.get(&path, &with_new).await.status, 404);
    assert_eq!(jwks.fetches(), 2);

    // Tokens naming kids nobody has are refused, as before, and within 5 s of the last
    // re-read they cause no other fetch.
    for i in 0..20 {
        let made_up = sign_pair(new, Some(&format!("made-up-{i}")), &claims);
        let refused = gw.get(&path, &made_up).await;
        assert_eq!(
            (refused.status, refused.body),
            (403, json!({"detail": "Invalid auth token"}))
        );
    }
    assert_eq!(jwks.fetches(), 2);
    let with_old = sign_pair(old, Some(&old.kid), &claims);
    assert_eq!(gw.get(&path, &with_old).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_withdrawn_from_the_jwks_stops_its_remembered_tokens_at_the_next_reread() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = test_pairs(dir.path());
    let (old, new) = (&pairs[0], &pairs[2]);
    let jwks = JwksServer::start(&[old, new]).await;
    let gw = Gateway::start_with(
        Backend::Memory,
        &[
            ("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL", &jwks.url),
            ("AIRSTATE_JWKS_REFRESH_SECONDS", "1"),
        ],
    )
    .await;
    let ti = gw.task().await;
    let path = ti_path(&ti, "k");
    let claims = claims_for(ti.id);
    let with_old = sign_pair(old, Some(&old.kid), &claims);
    let with_new = sign_pair(new, Some(&new.kid), &claims);
    // Verified, and so remembered (for up to 30 s).
    assert_eq!(gw.get(&path, &with_old).await.status, 404);
    assert_eq!(gw.get(&path, &with_new).await.status, 404);

    // Airflow withdraws the old key: once the JWKS is re-read, its tokens are refused,
    // remembered or not, while the other key's tokens keep working.
    jwks.serve(&[new]);
    let fetched = jwks.fetches();
    // The refresher fetches one after another, applying each result before the next: once
    // a second fetch has started, the first one after `serve` has been applied.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while jwks.fetches() < fetched + 2 {
        assert!(std::time::Instant::now() < deadline, "no JWKS re-read");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refused = gw.get(&path, &with_old).await;
    assert_eq!(
        (refused.status, refused.body),
        (403, json!({"detail": "Invalid auth token"}))
    );
    assert_eq!(gw.get(&path, &with_new).await.status, 404);
}
