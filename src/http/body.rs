//! Request bodies and parameters, validated the way Airflow's FastAPI models validate
//! them, with the same error list shape. The value itself is kept as the exact JSON text
//! received.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde_json::{json, Value};

use super::error::{ApiError, ValidationIssue};
use crate::store::pyjson;
use crate::store::rules::{self, KeyProblem, ValueProblem, MAX_KEY_CHARS};
use crate::store::EpochMillis;

/// A validated PUT body.
#[derive(Debug)]
pub struct PutBody<'a> {
    /// The JSON text of `value`, exactly as sent.
    pub value: &'a str,
    pub expires_at: Option<EpochMillis>,
}

/// Checks a key given in the path or query (`loc` says which, for the error list) by
/// the store's rule.
pub fn check_key(key: &str, loc: &[&str]) -> Result<(), ValidationIssue> {
    let Err(problem) = rules::check_key(key) else {
        return Ok(());
    };
    let (kind, ctx) = match problem {
        KeyProblem::Empty => ("string_too_short", json!({"min_length": 1})),
        KeyProblem::TooLong => ("string_too_long", json!({"max_length": MAX_KEY_CHARS})),
        KeyProblem::Nul => ("value_error", json!({"error": {}})),
    };
    Err(ValidationIssue::new(kind, loc, problem.to_string(), json!(key)).with_ctx(ctx))
}

/// FastAPI parses a body as JSON only under a JSON media type.
pub fn is_json_content_type(content_type: Option<&str>) -> bool {
    let Some(value) = content_type else {
        return false;
    };
    let media = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Parses and validates a task (`allow_expires_at`) or asset PUT body.
pub fn parse_put_body<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
    allow_expires_at: bool,
) -> Result<PutBody<'a>, ApiError> {
    let fields = parse_fields(content_type, body, allow_expires_at, true, false)?;
    Ok(PutBody {
        value: fields.value.unwrap_or_default(),
        expires_at: fields.expires_at.flatten(),
    })
}

/// An admin PATCH body: each member present is changed, each absent one kept.
#[derive(Debug)]
pub struct PatchBody<'a> {
    pub value: Option<&'a str>,
    /// `Some(None)`: an explicit `null`, which makes the key permanent.
    pub expires_at: Option<Option<EpochMillis>>,
    /// `"expires_at": "default"` was sent (Airflow's Core REST API only).
    pub expires_default: bool,
}

/// When a key written through Airflow's Core REST API expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreExpiry {
    /// Absent or `"default"`: `[state_store] default_retention_days` from now.
    Default,
    /// `null`: never.
    Never,
    At(EpochMillis),
}

/// Parses the body of Airflow's Core REST API task PUT: `value` plus an optional
/// `expires_at` that may also be the keyword `"default"`.
pub fn parse_core_task_put<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
) -> Result<(&'a str, CoreExpiry), ApiError> {
    let fields = parse_fields(content_type, body, true, true, true)?;
    let expiry = match (fields.expires_default, fields.expires_at) {
        (true, _) | (false, None) => CoreExpiry::Default,
        (false, Some(None)) => CoreExpiry::Never,
        (false, Some(Some(at))) => CoreExpiry::At(at),
    };
    Ok((fields.value.unwrap_or_default(), expiry))
}

/// Parses a task PATCH body: the PUT body's members, each optional, at least one given.
pub fn parse_patch_body<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
) -> Result<PatchBody<'a>, ApiError> {
    let fields = parse_fields(content_type, body, true, false, false)?;
    if fields.value.is_none() && fields.expires_at.is_none() {
        return Err(ApiError::Validation(vec![ValidationIssue::new(
            "value_error",
            &["body"],
            "Value error, give at least one of value and expires_at",
            json!({}),
        )]));
    }
    Ok(fields)
}

fn parse_fields<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
    allow_expires_at: bool,
    value_required: bool,
    default_keyword: bool,
) -> Result<PatchBody<'a>, ApiError> {
    if body.is_empty() {
        return Err(vec![ValidationIssue::missing(&["body"], Value::Null)].into());
    }
    let text = std::str::from_utf8(body).map_err(|_| {
        vec![ValidationIssue::new(
            "json_invalid",
            &["body", "0"],
            "JSON decode error",
            json!({}),
        )
        .with_ctx(json!({"error": "body is not valid UTF-8"}))]
    })?;
    if !is_json_content_type(content_type) {
        return Err(vec![not_an_object(json!(text))].into());
    }
    let text = without_bom(text);
    let fields = match pyjson::parse_document(text) {
        Ok((Some(members), _)) => members,
        Ok((None, _)) => {
            // Valid JSON that is not an object.
            let input = serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
            return Err(vec![not_an_object(input)].into());
        }
        Err(error) => return Err(syntax_error(error)),
    };

    let mut issues = Vec::new();
    let mut value = None;
    let mut expires_at = None;
    let mut expires_default = false;
    for (name, span) in &fields {
        let raw = &text[span.clone()];
        match name.as_str() {
            "value" => value = Some(raw),
            // Only Airflow's Core REST API knows the keyword; elsewhere it is a string that
            // is no datetime, refused below.
            "expires_at" if default_keyword && raw == "\"default\"" => expires_default = true,
            "expires_at" if allow_expires_at => match parse_expires_at(raw) {
                Ok(at) => expires_at = Some(at),
                Err(issue) => issues.push(issue),
            },
            other => issues.push(ValidationIssue::new(
                "extra_forbidden",
                &["body", other],
                "Extra inputs are not permitted",
                to_value(raw),
            )),
        }
    }
    match value {
        None if !value_required => {}
        None => {
            let whole: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            issues.insert(0, ValidationIssue::missing(&["body", "value"], whole));
        }
        Some(raw) => {
            if let Err(issue) = check_value(raw) {
                issues.insert(0, issue);
            }
        }
    }
    if issues.is_empty() {
        Ok(PatchBody {
            value,
            expires_at,
            expires_default,
        })
    } else {
        Err(issues.into())
    }
}

/// A body under a JSON media type that Python's `json` cannot read, as FastAPI answers
/// it: 422 `json_invalid` with Python's message and its position in characters, or 400
/// when nested deeper than Python's decoder goes.
pub fn syntax_error(error: pyjson::SyntaxError) -> ApiError {
    match error {
        pyjson::SyntaxError::Decode { msg, pos } => {
            let mut issue =
                ValidationIssue::new("json_invalid", &["body"], "JSON decode error", json!({}))
                    .with_ctx(json!({"error": msg}));
            issue.loc.push(json!(pos));
            ApiError::Validation(vec![issue])
        }
        pyjson::SyntaxError::TooDeep | pyjson::SyntaxError::IntegerTooLong => {
            ApiError::BodyUnparseable
        }
    }
}

/// Checks a body's JSON syntax before anything else looks at the request, as FastAPI
/// does (it reads the body while solving the route's dependencies, auth among them).
/// Bodies not declared as JSON, or not UTF-8, are left to the route.
pub fn check_syntax(content_type: Option<&str>, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() || !is_json_content_type(content_type) {
        return Ok(());
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Ok(());
    };
    pyjson::parse_document(without_bom(text))
        .map(drop)
        .map_err(syntax_error)
}

/// Starlette hands `json.loads` the body's bytes, and Python reads bytes that start with a
/// UTF-8 byte order mark as `utf-8-sig`: the mark is dropped, positions count after it.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

impl From<Vec<ValidationIssue>> for ApiError {
    fn from(issues: Vec<ValidationIssue>) -> Self {
        ApiError::Validation(issues)
    }
}

fn not_an_object(input: Value) -> ValidationIssue {
    ValidationIssue::new(
        "model_attributes_type",
        &["body"],
        "Input should be a valid dictionary or object to extract fields from",
        input,
    )
}

fn to_value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or(Value::Null)
}

/// The store's rules for a value (see [`rules::check_value`]), as the error list shows them.
fn check_value(raw: &str) -> Result<(), ValidationIssue> {
    rules::check_value(raw).map_err(|problem| match problem {
        ValueProblem::TooDeep(path, input) => {
            let mut issue = ValidationIssue::new(
                "recursion_depth_exceeded",
                &["body", "value"],
                "Recursion error - maximum validation depth exceeded",
                to_value(&input),
            );
            issue.loc.extend(path);
            issue
        }
        _ => {
            let input = match problem {
                ValueProblem::Null => Value::Null,
                _ => json!(raw),
            };
            ValidationIssue::new(
                "value_error",
                &["body", "value"],
                problem.to_string(),
                input,
            )
            .with_ctx(json!({"error": {}}))
        }
    })
}

/// `expires_at` as pydantic reads a datetime: ISO-8601 text or Unix seconds. A datetime
/// without an offset is refused (Airflow fails on it with a 500).
fn parse_expires_at(raw: &str) -> Result<Option<EpochMillis>, ValidationIssue> {
    let loc = ["body", "expires_at"];
    let value = to_value(raw);
    let invalid =
        |kind: &'static str, msg: String| ValidationIssue::new(kind, &loc, msg, value.clone());
    match &value {
        Value::Null => Ok(None),
        Value::Number(number) => number
            .as_f64()
            .and_then(epoch_number_to_millis)
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    "datetime_parsing",
                    "Input should be a valid datetime, dates after 9999 are not supported as unix timestamps".into(),
                )
            }),
        Value::String(text) => parse_datetime_text(text).map(Some).map_err(|problem| match problem {
            DatetimeProblem::Naive => invalid(
                "timezone_aware",
                "Input should have timezone info".into(),
            ),
            DatetimeProblem::Unparseable => {
                let error = date_error(text.as_bytes()).unwrap_or("invalid datetime format");
                invalid(
                    "datetime_from_date_parsing",
                    format!("Input should be a valid datetime or date, {error}"),
                )
                .with_ctx(json!({"error": error}))
            }
        }),
        _ => Err(invalid("datetime_type", "Input should be a valid datetime".into())),
    }
}

/// What speedate (pydantic's date parser) says of `text` read as a date; pydantic
/// reports a string that is no datetime with this error of its date reading.
pub fn date_error(text: &[u8]) -> Option<&'static str> {
    if text.len() < 10 {
        return Some("input is too short");
    }
    let digits = |range: std::ops::Range<usize>| text[range].iter().all(u8::is_ascii_digit);
    if !digits(0..4) {
        return Some("invalid character in year");
    }
    if text[4] != b'-' {
        return Some("invalid date separator, expected `-`");
    }
    if !digits(5..7) {
        return Some("invalid character in month");
    }
    if text[7] != b'-' {
        return Some("invalid date separator, expected `-`");
    }
    if !digits(8..10) {
        return Some("invalid character in day");
    }
    let number = |range: std::ops::Range<usize>| {
        text[range]
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
    };
    let (year, month, day) = (number(0..4) as i32, number(5..7), number(8..10));
    if !(1..=12).contains(&month) {
        return Some("month value is outside expected range of 1-12");
    }
    if NaiveDate::from_ymd_opt(year, month, day).is_none() {
        return Some("day value is outside expected range");
    }
    (text.len() > 10).then_some("unexpected extra characters at the end of the input")
}

/// What speedate says of `text` read as a datetime (pydantic reports a string that is no
/// date, such as a bad `Airflow-API-Version`, with this error).
pub fn datetime_error(text: &[u8]) -> &'static str {
    if let Some(error) =
        date_error(text).filter(|_| text.len() <= 10 || date_error(&text[..10]).is_some())
    {
        return error;
    }
    if text.len() <= 10 {
        return "invalid datetime format";
    }
    if !matches!(text[10], b'T' | b't' | b'_' | b' ') {
        return "invalid datetime separator, expected `T`, `t`, `_` or space";
    }
    let rest = &text[11..];
    if rest.len() < 2 || !rest[..2].iter().all(u8::is_ascii_digit) {
        return "invalid character in hour";
    }
    if rest.len() < 5 || rest[2] != b':' {
        return "invalid time separator, expected `:`";
    }
    if !rest[3..5].iter().all(u8::is_ascii_digit) {
        return "invalid character in minute";
    }
    "unexpected extra characters at the end of the input"
}

/// Pydantic treats numbers above 2e10 as milliseconds.
fn epoch_number_to_millis(number: f64) -> Option<EpochMillis> {
    if !number.is_finite() {
        return None;
    }
    let millis = if number.abs() > 2e10 {
        number
    } else {
        number * 1000.0
    };
    // Up to year 9999.
    (millis.abs() < 253_402_300_800_000.0).then_some(millis.round() as EpochMillis)
}

enum DatetimeProblem {
    Naive,
    Unparseable,
}

fn parse_datetime_text(text: &str) -> Result<EpochMillis, DatetimeProblem> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_millis());
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M%#z",
    ] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Ok(at.timestamp_millis());
        }
    }
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        if let Some(millis) = text.parse::<f64>().ok().and_then(epoch_number_to_millis) {
            return Ok(millis);
        }
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .any(|format| NaiveDateTime::parse_from_str(text, format).is_ok())
        || NaiveDate::parse_from_str(text, "%Y-%m-%d").is_ok();
    Err(if naive {
        DatetimeProblem::Naive
    } else {
        DatetimeProblem::Unparseable
    })
}

/// `all_map_indices` as pydantic parses a bool query parameter.
pub fn parse_bool_param(name: &str, value: Option<&str>) -> Result<bool, ValidationIssue> {
    let Some(value) = value else {
        return Ok(false);
    };
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" | "t" | "y" => Ok(true),
        "false" | "0" | "no" | "off" | "f" | "n" => Ok(false),
        _ => Err(ValidationIssue::new(
            "bool_parsing",
            &["query", name],
            "Input should be a valid boolean, unable to interpret input",
            json!(value),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn kinds(result: Result<PutBody<'_>, ApiError>) -> Vec<&'static str> {
        match result.unwrap_err() {
            ApiError::Validation(issues) => issues.iter().map(|issue| issue.kind).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Starlette gives `json.loads` bytes, which Python decodes as `utf-8-sig`.
    #[test]
    fn a_byte_order_mark_is_skipped() {
        let body = b"\xef\xbb\xbf{\"value\": [1]}";
        assert_eq!(parse_put_body(JSON, body, true).unwrap().value, "[1]");
        assert!(check_syntax(JSON, body).is_ok());
        let broken = b"\xef\xbb\xbf{\"value\" 1}";
        let Err(ApiError::Validation(issues)) = check_syntax(JSON, broken) else {
            panic!("accepted");
        };
        assert_eq!(issues[0].loc, [json!("body"), json!(9)]);
        // Not declared as JSON: nothing is decoded, the mark is part of the input.
        assert_eq!(
            kinds(parse_put_body(Some("text/plain"), body, true)),
            ["model_attributes_type"]
        );
    }

    /// Python's `int` stops at 4,300 digits; FastAPI answers the `ValueError` with a 400.
    #[test]
    fn integers_past_pythons_digit_limit_are_unparseable() {
        let body = |digits: usize| format!("{{\"value\": {}}}", "9".repeat(digits));
        assert!(parse_put_body(JSON, body(4300).as_bytes(), true).is_ok());
        assert!(matches!(
            parse_put_body(JSON, body(4301).as_bytes(), true),
            Err(ApiError::BodyUnparseable)
        ));
        assert!(matches!(
            check_syntax(JSON, body(4301).as_bytes()),
            Err(ApiError::BodyUnparseable)
        ));
    }

    #[test]
    fn values_are_kept_as_sent() {
        for value in [
            "1.0",
            "123456789012345678901234567890",
            "\"\"",
            "{\"a\" : [1,2]}",
            "false",
            "[]",
        ] {
            let body = format!("{{\"value\": {value}}}");
            let parsed = parse_put_body(JSON, body.as_bytes(), true).unwrap();
            assert_eq!(parsed.value, value);
            assert_eq!(parsed.expires_at, None);
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert_eq!(
            kinds(parse_put_body(JSON, b"{\"value\": null}", true)),
            ["value_error"]
        );
        assert_eq!(
            kinds(parse_put_body(
                JSON,
                b"{\"value\": [1, {\"x\": 1e400}]}",
                true
            )),
            ["value_error"]
        );
        assert_eq!(
            kinds(parse_put_body(JSON, b"{\"value\": NaN}", true)),
            ["value_error"]
        );
        assert_eq!(kinds(parse_put_body(JSON, b"{}", true)), ["missing"]);
        assert_eq!(
            kinds(parse_put_body(JSON, b"{\"value\": 1, \"x\": 2}", true)),
            ["extra_forbidden"]
        );
        assert_eq!(
            kinds(parse_put_body(JSON, b"[1]", true)),
            ["model_attributes_type"]
        );
        assert_eq!(
            kinds(parse_put_body(Some("text/plain"), b"{\"value\": 1}", true)),
            ["model_attributes_type"]
        );
        assert_eq!(kinds(parse_put_body(JSON, b"", true)), ["missing"]);
        // Assets take no expiry.
        assert_eq!(
            kinds(parse_put_body(
                JSON,
                b"{\"value\": 1, \"expires_at\": null}",
                false
            )),
            ["extra_forbidden"]
        );
    }

    #[test]
    fn expiry_forms() {
        let at = |expires: &str| {
            let body = format!("{{\"value\": 1, \"expires_at\": {expires}}}");
            parse_put_body(JSON, body.as_bytes(), true)
                .map(|b| b.expires_at)
                .map_err(|e| match e {
                    ApiError::Validation(issues) => issues[0].kind,
                    other => panic!("{other:?}"),
                })
        };
        assert_eq!(at("\"2030-01-01T00:00:00Z\""), Ok(Some(1_893_456_000_000)));
        assert_eq!(
            at("\"2030-01-01T01:00:00+01:00\""),
            Ok(Some(1_893_456_000_000))
        );
        assert_eq!(
            at("\"2030-01-01T00:00:00.5+00:00\""),
            Ok(Some(1_893_456_000_500))
        );
        assert_eq!(at("1893456000"), Ok(Some(1_893_456_000_000)));
        assert_eq!(at("1893456000.25"), Ok(Some(1_893_456_000_250)));
        assert_eq!(at("null"), Ok(None));
        assert_eq!(at("\"2030-01-01T00:00:00\""), Err("timezone_aware"));
        assert_eq!(at("\"2030-01-01\""), Err("timezone_aware"));
        assert_eq!(at("\"soon\""), Err("datetime_from_date_parsing"));
        // As pydantic 2 words them.
        for (text, error) in [
            ("soon", "input is too short"),
            (
                "2030-13-01T00:00:00Z",
                "month value is outside expected range of 1-12",
            ),
            (
                "2030-02-30T00:00:00Z",
                "day value is outside expected range",
            ),
            (
                "2030-01-01T25:00:00Z",
                "unexpected extra characters at the end of the input",
            ),
            (
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "invalid character in year",
            ),
            ("2030/01/01", "invalid date separator, expected `-`"),
        ] {
            assert_eq!(date_error(text.as_bytes()), Some(error), "{text}");
        }
        for (text, error) in [
            ("garbage", "input is too short"),
            ("2026-6-30", "input is too short"),
            ("2026-06-3x", "invalid character in day"),
            ("abcdefghijkl", "invalid character in year"),
            (
                "2026-13-01",
                "month value is outside expected range of 1-12",
            ),
            ("2026/06/30", "invalid date separator, expected `-`"),
            (
                "2026-06-30x",
                "invalid datetime separator, expected `T`, `t`, `_` or space",
            ),
        ] {
            assert_eq!(datetime_error(text.as_bytes()), error, "{text}");
        }
        assert_eq!(at("true"), Err("datetime_type"));
    }

    #[test]
    fn keys() {
        assert!(check_key("a/b", &["path", "key"]).is_ok());
        assert_eq!(
            check_key("", &["path", "key"]).unwrap_err().kind,
            "string_too_short"
        );
        assert!(check_key(&"é".repeat(512), &["path", "key"]).is_ok());
        assert_eq!(
            check_key(&"k".repeat(513), &["path", "key"])
                .unwrap_err()
                .kind,
            "string_too_long"
        );
    }
}
