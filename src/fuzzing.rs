//! The bodies of the fuzz targets in `fuzz/` (issue 15), one function per parser. They live
//! here, not in the fuzz crate, so that `tests/it/fuzz_corpus.rs` replays every committed
//! corpus input through the very same checks in the default (stable) test run, and so that
//! they can reach the crate's private parsers. Each panics when an invariant of its parser
//! does not hold, not only when the parser itself panics.
//!
//! Run them with `scripts/fuzz` (README, "Fuzzing").

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::Path;
use axum::http::header::{ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use futures_util::FutureExt;
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

use crate::http::asset::{self, By};
use crate::http::body::{self, CoreExpiry};
use crate::http::conditional::{condition, etag, with_etag};
use crate::http::error::ApiError;
use crate::http::extensions::{keys_from_query, MAX_BULK_KEYS};
use crate::http::extract::query_params;
use crate::http::{core_api, routes};
use crate::identity::AssetRef;
use crate::migrate::{self, Item};
use crate::store::pyjson::{self, SyntaxError};
use crate::store::rules::{self, MAX_KEY_CHARS};
use crate::store::version::{is_version, new_version, Tags};
use crate::store::Condition;

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 5] = [
    "pyjson",
    "put_body",
    "keys_and_queries",
    "if_match",
    "import",
];

/// Runs the target `name` on one input (the corpus replay's entry point).
pub fn run(name: &str, data: &[u8]) {
    match name {
        "pyjson" => pyjson(data),
        "put_body" => put_body(data),
        "keys_and_queries" => keys_and_queries(data),
        "if_match" => if_match(data),
        "import" => import(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// An error the API answers must be the client's (4xx), never a 500.
fn assert_client_error(error: ApiError, what: &str) {
    let status = error.into_response().status();
    assert!(status.is_client_error(), "{what}: answered {status}");
}

/// The text of a value the rules accept: no `NaN`/`Infinity`, no lone surrogate, not too deep.
fn clean(facts: &pyjson::Facts) -> bool {
    !facts.non_finite && facts.lone_surrogate.is_none() && facts.too_deep.is_none()
}

/// `pyjson::parse_document` / `facts_of` and the value rules (`check_value`,
/// `check_value_text`):
/// - the same text gives the same result twice, and an error's position is inside the text;
/// - strict JSON (serde_json, whose 128 levels are within the 974 containers) is accepted,
///   and a top-level object has the same members in the same order with the same values
///   (a repeated name: Python's place and value);
/// - conversely, accepted text without `NaN`, `Infinity`, huge numbers or lone surrogates is
///   strict JSON (unless nested beyond serde_json's 128 levels);
/// - a document's facts are those of `facts_of` on the same text;
/// - each member's span is a document of its own, which `check_value` and
///   `check_value_text` judge alike;
/// - `check_value_text` accepts only documents whose facts are clean.
pub fn pyjson(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    let parsed = pyjson::parse_document(text);
    assert_eq!(parsed, pyjson::parse_document(text), "not deterministic");
    if let Err(SyntaxError::Decode { pos, .. }) = &parsed {
        assert!(*pos <= text.chars().count(), "position {pos} past the end");
    }
    let strict = serde_json::from_str::<Value>(text);
    if let Ok(strict) = &strict {
        let Ok((members, _)) = &parsed else {
            panic!("strict JSON refused: {parsed:?}");
        };
        match (strict, members) {
            (Value::Object(map), Some(members)) => {
                // serde_json's map keeps insertion order (`preserve_order`) and, like
                // Python's dict, a repeated name keeps its first place and its last value.
                assert!(
                    map.keys().eq(members.iter().map(|(name, _)| name)),
                    "member order: {:?}",
                    members.iter().map(|(name, _)| name).collect::<Vec<_>>()
                );
                for (name, span) in members {
                    let value: Value = serde_json::from_str(&text[span.clone()])
                        .unwrap_or_else(|e| panic!("member {name:?}'s span: {e}"));
                    assert_eq!(map.get(name), Some(&value), "member {name:?}");
                }
            }
            (Value::Object(_), None) => panic!("an object without members"),
            (_, Some(_)) => panic!("members of a non-object"),
            (_, None) => {}
        }
    }
    let Ok((members, facts)) = parsed else {
        assert!(
            matches!(
                rules::check_value_text(text),
                Err(rules::ValueProblem::NotJson(_))
            ),
            "check_value_text accepted what parse_document refused"
        );
        return;
    };
    if let Err(error) = &strict {
        if !facts.non_finite && facts.lone_surrogate.is_none() {
            let why = error.to_string();
            assert!(
                why.starts_with("recursion limit exceeded")
                    || why.starts_with("number out of range"),
                "accepted, clean, yet not strict JSON: {why}"
            );
        }
    }
    assert_eq!(pyjson::facts_of(text), facts, "facts_of differs");
    for (name, span) in members.iter().flatten() {
        let member = &text[span.clone()];
        assert!(
            pyjson::parse_document(member).is_ok(),
            "member {name:?} is no document: {member:?}"
        );
        assert_eq!(
            rules::check_value(member),
            rules::check_value_text(member),
            "member {name:?}"
        );
    }
    if rules::check_value_text(text).is_ok() {
        assert!(clean(&facts), "accepted with {facts:?}");
        assert_ne!(text.trim_matches([' ', '\t', '\n', '\r']), "null");
    }
}

const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/json"),
    Some("application/merge-patch+json; charset=utf-8"),
    Some("text/plain"),
    None,
];

/// UTF-8's byte order mark, which Python's `json.loads` skips at the start of bytes.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// The body of a PUT / PATCH (`body::parse_put_body`, `parse_patch_body`,
/// `parse_core_task_put`, `check_syntax`). The first byte picks the media type and whether
/// `expires_at` is allowed; the rest is the body.
/// - every refusal is a 4xx, and a syntax error found by the early `check_syntax` is the
///   very error the route gives;
/// - under a JSON media type, a UTF-8 byte order mark before a body changes nothing;
/// - an accepted value is a slice of the body, passes the value rules, and sent again as
///   `{"value": <it>}` (with its `expires_at` as RFC 3339 text) is accepted as the same;
/// - what the Execution API's PUT accepts, the PATCH and the Core REST API's PUT accept
///   with the same value and expiry.
pub fn put_body(data: &[u8]) {
    let Some((&selector, body_bytes)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector >> 1) % CONTENT_TYPES.len()];
    let allow_expires_at = selector & 1 == 1;

    let early = body::check_syntax(content_type, body_bytes).map_err(|e| format!("{e:?}"));
    let put = body::parse_put_body(content_type, body_bytes, allow_expires_at);
    if let Err(early) = &early {
        let route = put.as_ref().map(|_| ()).map_err(|e| format!("{e:?}"));
        assert_eq!(
            route.as_ref(),
            Err(early),
            "check_syntax and the route differ"
        );
    }
    // An empty body is no body (FastAPI: "Field required"); the mark alone is JSON text
    // that is empty ("Expecting value").
    if body::is_json_content_type(content_type)
        && !body_bytes.is_empty()
        && !body_bytes.starts_with(BOM)
    {
        let marked = [BOM, body_bytes].concat();
        assert_eq!(
            format!(
                "{:?}",
                body::parse_put_body(content_type, &marked, allow_expires_at)
            ),
            format!("{put:?}"),
            "a byte order mark changed the answer"
        );
    }
    let patch = body::parse_patch_body(content_type, body_bytes);
    let core = body::parse_core_task_put(content_type, body_bytes);
    if let Ok(patch) = &patch {
        assert!(patch.value.is_some() || patch.expires_at.is_some());
        if let Some(value) = patch.value {
            assert_eq!(rules::check_value(value), Ok(()), "PATCH value {value:?}");
        }
    }
    if let Ok((value, _)) = &core {
        assert_eq!(
            rules::check_value(value),
            Ok(()),
            "Core API value {value:?}"
        );
    }
    let put = match put {
        Ok(put) => put,
        Err(error) => {
            assert_client_error(error, "PUT");
            if let Err(error) = patch {
                assert_client_error(error, "PATCH");
            }
            if let Err(error) = core {
                assert_client_error(error, "Core API PUT");
            }
            return;
        }
    };
    let value = put.value;
    let range = body_bytes.as_ptr_range();
    let value_range = value.as_bytes().as_ptr_range();
    assert!(
        range.start <= value_range.start && value_range.end <= range.end,
        "the value is not the text sent"
    );
    assert_eq!(rules::check_value(value), Ok(()), "{value:?}");
    assert_eq!(rules::check_value_text(value), Ok(()), "{value:?}");
    if !allow_expires_at {
        assert_eq!(put.expires_at, None);
    }
    let mut again = format!("{{\"value\": {value}");
    // RFC 3339 reaches back to year 0; pydantic's Unix seconds further.
    if let Some(at) = put.expires_at.filter(|at| *at >= -62_167_219_200_000) {
        again.push_str(&format!(", \"expires_at\": \"{}\"", migrate::rfc3339(at)));
    }
    again.push('}');
    let reread = body::parse_put_body(Some("application/json"), again.as_bytes(), true)
        .unwrap_or_else(|e| panic!("{again:?} refused: {e:?}"));
    assert_eq!(reread.value, value);
    if put.expires_at.is_some_and(|at| at >= -62_167_219_200_000) {
        assert_eq!(reread.expires_at, put.expires_at, "{again:?}");
    }
    if allow_expires_at {
        let patch = patch.unwrap_or_else(|e| panic!("PUT accepted, PATCH refused: {e:?}"));
        assert_eq!(patch.value, Some(value));
        let (core_value, expiry) =
            core.unwrap_or_else(|e| panic!("PUT accepted, Core API PUT refused: {e:?}"));
        assert_eq!(core_value, value);
        match put.expires_at {
            Some(at) => assert_eq!(expiry, CoreExpiry::At(at)),
            None => assert!(matches!(expiry, CoreExpiry::Never | CoreExpiry::Default)),
        }
    }
}

const TASK_INSTANCE: &str = "0195d3a2-7b1c-7c3e-9a4b-1f2e3d4c5b6a";

/// A router with the key routes' own patterns, answering the path parameters it decoded.
fn path_router() -> Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            async fn params(Path(params): Path<HashMap<String, String>>) -> axum::Json<Value> {
                axum::Json(serde_json::json!(params))
            }
            Router::new()
                .route(routes::TI_KEY, axum::routing::get(params))
                .route(routes::ASSET_AIP103_KEY, axum::routing::get(params))
        })
        .clone()
}

/// The path parameters the router decodes from `path`: `None` when it matches no key route,
/// `Some(Err(status))` when it refuses the parameters.
fn route_params(path: &str) -> Option<Result<HashMap<String, String>, StatusCode>> {
    let request = Request::get(path).body(Body::empty()).ok()?;
    if request.uri().path() != path {
        return None;
    }
    let mut router = path_router();
    let response = tower_service::Service::call(&mut router, request)
        .now_or_never()
        .expect("the router answers at once")
        .unwrap_or_else(|never| match never {});
    match response.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return None,
        status => return Some(Err(status)),
    }
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .now_or_never()
        .expect("a buffered body")
        .expect("a readable body");
    Some(Ok(
        serde_json::from_slice(&bytes).expect("the parameters as JSON")
    ))
}

/// Keys and query strings: `rules::check_key` (and the HTTP layer's wording of it), path
/// decoding by the key routes' patterns, `?keys=` of bulk reads, the asset routes' `?name=`
/// / `?uri=` / `?key=`, and the Core REST API's `map_index` / `limit` / `offset` /
/// `all_map_indices`.
/// - both key checks agree, and an accepted key is 1 to 512 characters without NUL;
/// - a key (and asset name) percent-encoded into the path decodes to itself; a raw path
///   decodes to its percent-decoding, and is refused only when that is not UTF-8;
/// - accepted bulk keys are the `keys` parameter split at commas, each a valid key, without
///   repeats, 1 to 10,000 of them; accepted asset parameters are the query's, valid keys;
/// - an accepted Core REST API query has `map_index >= -1` and a capped page; every
///   refusal is a 4xx.
pub fn keys_and_queries(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    let rule = rules::check_key(text);
    assert_eq!(
        rule.is_ok(),
        body::check_key(text, &["path", "key"]).is_ok(),
        "the two key checks differ"
    );
    if rule.is_ok() {
        let chars = text.chars().count();
        assert!((1..=MAX_KEY_CHARS).contains(&chars) && !text.contains('\0'));
    }

    // Path segments: the whole text as a key, then split into an asset name and a key.
    if !text.is_empty() {
        let encoded = utf8_percent_encode(text, NON_ALPHANUMERIC).to_string();
        let path = format!("/execution/store/ti/{TASK_INSTANCE}/{encoded}");
        let params = route_params(&path)
            .expect("an encoded key routes")
            .expect("decodes");
        assert_eq!(params.get("key").map(String::as_str), Some(text), "{path}");
        assert_eq!(
            params.get("task_instance_id").map(String::as_str),
            Some(TASK_INSTANCE)
        );
        let middle = text
            .char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i);
        let (name, key) = text.split_at(middle);
        if !name.is_empty() && !key.is_empty() {
            let path = format!(
                "/execution/state/asset/{}/{}",
                utf8_percent_encode(name, NON_ALPHANUMERIC),
                utf8_percent_encode(key, NON_ALPHANUMERIC)
            );
            let params = route_params(&path)
                .expect("an encoded asset routes")
                .expect("decodes");
            assert_eq!(params.get("name").map(String::as_str), Some(name), "{path}");
            assert_eq!(params.get("key").map(String::as_str), Some(key), "{path}");
        }
        let raw = format!("/execution/store/ti/{TASK_INSTANCE}/{text}");
        if let Some(routed) = route_params(&raw) {
            let tail = &raw[raw.len() - text.len()..];
            let decoded = percent_decode_str(tail).decode_utf8();
            match (routed, decoded) {
                (Ok(params), Ok(decoded)) => {
                    assert_eq!(
                        params.get("key").map(String::as_str),
                        Some(decoded.as_ref())
                    )
                }
                (Err(status), Err(_)) => assert!(status.is_client_error()),
                (routed, decoded) => panic!("{raw:?}: routed {routed:?}, decoded {decoded:?}"),
            }
        }
    }

    let params = query_params(Some(text));
    match keys_from_query(Some(text)) {
        Ok(keys) => {
            assert!((1..=MAX_BULK_KEYS).contains(&keys.len()));
            let mut seen = HashSet::new();
            let listed = params.get("keys").expect("keys were given");
            let expected: Vec<&str> = listed.split(',').filter(|k| seen.insert(*k)).collect();
            assert_eq!(keys, expected);
            for key in &keys {
                assert_eq!(rules::check_key(key), Ok(()), "{key:?}");
            }
        }
        Err(error) => assert_client_error(error, "?keys="),
    }
    for (by, name) in [(By::Name, "name"), (By::Uri, "uri")] {
        for with_key in [false, true] {
            match asset::from_query(by, Some(text), with_key) {
                Ok((asset, key)) => {
                    let given = match &asset {
                        AssetRef::Name(given) | AssetRef::Uri(given) => given,
                    };
                    assert_eq!(Some(given), params.get(name));
                    assert_eq!(rules::check_key(given), Ok(()));
                    assert_eq!(key.is_some(), with_key);
                    if let Some(key) = &key {
                        assert_eq!(Some(key), params.get("key"));
                        assert_eq!(rules::check_key(key), Ok(()));
                    }
                }
                Err(error) => assert_client_error(error, "asset query"),
            }
        }
    }
    match core_api::parse_query(Some(text)) {
        Ok(query) => {
            assert!(query.map_index >= -1);
            assert!(query.limit <= core_api::MAX_PAGE_LIMIT);
            let all = body::parse_bool_param(
                "all_map_indices",
                params.get("all_map_indices").map(String::as_str),
            );
            assert_eq!(all.ok(), Some(query.all_map_indices));
            let _ = query.offset;
        }
        Err(error) => assert_client_error(error, "Core API query"),
    }
}

/// Renders tags as a header value `condition` reads back (`None`: no header can say it).
fn render(tags: &Tags) -> Option<String> {
    match tags {
        Tags::Any => Some("*".into()),
        Tags::Listed(tags) if tags.is_empty() => None,
        Tags::Listed(tags) => Some(
            tags.iter()
                .map(|tag| format!("\"{tag}\""))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

/// `conditional::condition` and `etag`. The input up to its first NUL is `If-Match`, the
/// rest `If-None-Match`, one header line per `\n`.
/// - the same headers give the same condition; a refusal is a 400;
/// - a parsed condition written back as headers parses to itself, and lists no tag holding
///   `"` or `,`;
/// - `If-Match: <etag(v)>` allows exactly version `v`, `If-None-Match` with `etag(v)` or its
///   weak form refuses exactly `v`, for every version airstate mints and for any tag text
///   that can be a header (visible ASCII without `"` or `,`); `with_etag` sends `etag(v)`.
pub fn if_match(data: &[u8]) {
    let (matched, none_matched) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    for (name, lines) in [(IF_MATCH, matched), (IF_NONE_MATCH, none_matched)] {
        if lines.is_empty() {
            continue;
        }
        for line in lines.split(|b| *b == b'\n') {
            if let Ok(value) = HeaderValue::from_bytes(line) {
                headers.append(name.clone(), value);
            }
        }
    }
    let parsed = condition(&headers);
    match (&parsed, condition(&headers)) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "not deterministic"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("not deterministic: {a:?} / {b:?}"),
    }
    match parsed {
        Err(error) => {
            assert!(matches!(error, ApiError::BadHeader(_)), "{error:?}");
            assert_eq!(error.into_response().status(), StatusCode::BAD_REQUEST);
        }
        Ok(parsed) => {
            let mut again = HeaderMap::new();
            let mut renderable = true;
            for (name, tags) in [
                (IF_MATCH, &parsed.if_match),
                (IF_NONE_MATCH, &parsed.if_none_match),
            ] {
                let Some(tags) = tags else { continue };
                if let Tags::Listed(listed) = tags {
                    for tag in listed {
                        assert!(!tag.contains(['"', ',']), "tag {tag:?}");
                    }
                }
                match render(tags) {
                    Some(text) => {
                        again.insert(name, HeaderValue::from_str(&text).expect("visible ASCII"));
                    }
                    None => renderable = false,
                }
            }
            if renderable {
                let reparsed =
                    condition(&again).unwrap_or_else(|e| panic!("{again:?} refused: {e:?}"));
                assert_eq!(reparsed, parsed, "{again:?}");
            }
        }
    }

    let text = String::from_utf8_lossy(data);
    let candidate = text.as_ref();
    let headerable = !candidate.is_empty()
        && candidate.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !candidate.contains(['"', ',']);
    let minted = new_version();
    assert!(is_version(&minted));
    for version in [Some(minted.as_str()), headerable.then_some(candidate)]
        .into_iter()
        .flatten()
    {
        let tag = etag(version).unwrap_or_else(|| panic!("no ETag for {version:?}"));
        let answered = with_etag(StatusCode::NO_CONTENT.into_response(), Some(version));
        assert_eq!(answered.headers().get(ETAG), Some(&tag));
        let other = format!("{version}0");
        let mut headers = HeaderMap::new();
        headers.insert(IF_MATCH, tag.clone());
        let c = condition(&headers).unwrap_or_else(|e| panic!("If-Match {tag:?}: {e:?}"));
        assert_eq!(c.if_match, Some(Tags::Listed(vec![version.to_owned()])));
        assert!(c.allows(Some(version)) && !c.allows(Some(&other)) && !c.allows(None));
        for tag in [
            tag.clone(),
            HeaderValue::from_str(&format!("W/{}", tag.to_str().unwrap())).unwrap(),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(IF_NONE_MATCH, tag.clone());
            let c = condition(&headers).unwrap_or_else(|e| panic!("If-None-Match {tag:?}: {e:?}"));
            assert!(!c.allows(Some(version)) && c.allows(Some(&other)) && c.allows(None));
        }
        if is_version(version) {
            let c = Condition {
                if_match: Some(Tags::Listed(vec![version.to_owned()])),
                if_none_match: None,
            };
            assert_eq!(c.to_args().0, format!(",{version},"));
        }
    }
}

/// The JSON-lines import (`migrate::parse_line`, `read_items`): the input is a file.
/// - every line an import accepts, exported again and parsed again, is the same item;
/// - what it accepts the API accepts: its key passes the key rule, and its value sent as
///   `{"value": <it>}` is accepted as the same text;
/// - a file is accepted only when each non-blank line is.
pub fn import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(
            migrate::read_items(&mut &data[..]).is_err(),
            "not UTF-8, yet read"
        );
        return;
    };
    let mut all_lines_ok = true;
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let item = match migrate::parse_line(line) {
            Ok(item) => item,
            Err(_) => {
                all_lines_ok = false;
                continue;
            }
        };
        let exported = item.export_line();
        let again = migrate::parse_line(&exported)
            .unwrap_or_else(|e| panic!("{exported} refused on re-import: {e}"));
        assert_eq!(again, item, "{exported}");
        let (key, json) = match &item {
            Item::Task { key, json, .. } | Item::Asset { key, json, .. } => (key, json),
        };
        assert_eq!(rules::check_key(key), Ok(()));
        let body = format!("{{\"value\": {json}}}");
        let put = body::parse_put_body(Some("application/json"), body.as_bytes(), false)
            .unwrap_or_else(|e| panic!("imported, yet the API refuses {body:?}: {e:?}"));
        assert_eq!(put.value, json);
    }
    let read = migrate::read_items(&mut text.as_bytes());
    assert_eq!(
        read.is_ok(),
        all_lines_ok,
        "a file is read iff each line is"
    );
}
