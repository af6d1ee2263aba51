//! Request bodies and parameters, validated the way Airflow's FastAPI models validate
//! them, with the same error list shape. The value itself is kept as the exact JSON text
//! received.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::{ApiError, ValidationIssue};
use crate::store::EpochMillis;

/// Airflow stores keys in `VARCHAR(512)`.
pub const MAX_KEY_CHARS: usize = 512;

/// A validated PUT body.
#[derive(Debug)]
pub struct PutBody<'a> {
    /// The JSON text of `value`, exactly as sent.
    pub value: &'a str,
    pub expires_at: Option<EpochMillis>,
}

/// Checks a key given in the path or query (`loc` says which, for the error list).
pub fn check_key(key: &str, loc: &[&str]) -> Result<(), ValidationIssue> {
    if key.is_empty() {
        return Err(ValidationIssue::new(
            "string_too_short",
            loc,
            "String should have at least 1 character",
            json!(key),
        )
        .with_ctx(json!({"min_length": 1})));
    }
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(ValidationIssue::new(
            "string_too_long",
            loc,
            format!("String should have at most {MAX_KEY_CHARS} characters"),
            json!(key),
        )
        .with_ctx(json!({"max_length": MAX_KEY_CHARS})));
    }
    Ok(())
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
) -> Result<PutBody<'a>, Vec<ValidationIssue>> {
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
) -> Result<(&'a str, CoreExpiry), Vec<ValidationIssue>> {
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
) -> Result<PatchBody<'a>, Vec<ValidationIssue>> {
    let fields = parse_fields(content_type, body, true, false, false)?;
    if fields.value.is_none() && fields.expires_at.is_none() {
        return Err(vec![ValidationIssue::new(
            "value_error",
            &["body"],
            "Value error, give at least one of value and expires_at",
            json!({}),
        )]);
    }
    Ok(fields)
}

fn parse_fields<'a>(
    content_type: Option<&str>,
    body: &'a [u8],
    allow_expires_at: bool,
    value_required: bool,
    default_keyword: bool,
) -> Result<PatchBody<'a>, Vec<ValidationIssue>> {
    if body.is_empty() {
        return Err(vec![ValidationIssue::missing(&["body"], Value::Null)]);
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
        return Err(vec![not_an_object(json!(text))]);
    }
    let fields = match serde_json::from_str::<ObjectFields<'a>>(text) {
        Ok(fields) => fields.0,
        Err(error) if error.classify() == serde_json::error::Category::Data => {
            // Valid JSON that is not an object.
            let input = serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
            return Err(vec![not_an_object(input)]);
        }
        Err(error) => {
            let mut issue =
                ValidationIssue::new("json_invalid", &["body"], "JSON decode error", json!({}))
                    .with_ctx(json!({"error": error.to_string()}));
            issue.loc.push(json!(byte_offset(text, &error)));
            return Err(vec![issue]);
        }
    };

    let mut issues = Vec::new();
    let mut value = None;
    let mut expires_at = None;
    let mut expires_default = false;
    for (name, raw) in &fields {
        match name.as_ref() {
            "value" => value = Some(*raw),
            // Only Airflow's Core REST API knows the keyword; elsewhere it is a string that
            // is no datetime, refused below.
            "expires_at" if default_keyword && raw.get() == "\"default\"" => expires_default = true,
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
            value: value.map(RawValue::get),
            expires_at,
            expires_default,
        })
    } else {
        Err(issues)
    }
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

fn to_value(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// Where decoding failed, as Python's `json` reports it (FastAPI puts it in `loc`).
fn byte_offset(text: &str, error: &serde_json::Error) -> usize {
    if error.is_eof() {
        return text.len();
    }
    let line_start: usize = text
        .split_inclusive('\n')
        .take(error.line().saturating_sub(1))
        .map(str::len)
        .sum();
    line_start + error.column().saturating_sub(1)
}

/// The Execution API's rules for a value, for JSON text that did not come in a request
/// (`airstate import`): one JSON value, not `null`, finite numbers only.
pub fn check_value_text(text: &str) -> Result<(), String> {
    let raw: &RawValue = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    check_value(raw).map_err(|issue| issue.msg)
}

/// `null` is refused (Airflow: "value cannot be null"), and so is a non-finite number
/// anywhere in the value: Airflow answers 500 for a top-level one and stores a nested one
/// that later breaks every read.
fn check_value(raw: &RawValue) -> Result<(), ValidationIssue> {
    let text = raw.get();
    if text == "null" {
        return Err(ValidationIssue::new(
            "value_error",
            &["body", "value"],
            "Value error, value cannot be null",
            Value::Null,
        )
        .with_ctx(json!({"error": {}})));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    match deserializer.deserialize_any(FiniteCheck) {
        Ok(()) => Ok(()),
        Err(_) => Err(ValidationIssue::new(
            "value_error",
            &["body", "value"],
            "Value error, value must be a finite number; NaN and Inf are not JSON representable",
            json!(text),
        )
        .with_ctx(json!({"error": {}}))),
    }
}

/// Walks a JSON value without building it, failing on a number that does not fit a
/// finite double (serde_json reports `1e400` as out of range).
struct FiniteCheck;

impl<'de> Visitor<'de> for FiniteCheck {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("non-finite number"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FiniteSeed)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(FiniteSeed)?;
        }
        Ok(())
    }
}

struct FiniteSeed;

impl<'de> de::DeserializeSeed<'de> for FiniteSeed {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(FiniteCheck)
    }
}

/// The top-level object's members in order, values left as raw JSON text.
struct ObjectFields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> de::Deserialize<'de> for ObjectFields<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
            type Value = ObjectFields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(Cow<'a, str>, &'a RawValue)> = Vec::new();
                while let Some(name) = map.next_key::<Cow<'a, str>>()? {
                    let raw: &'a RawValue = map.next_value()?;
                    // Python's json keeps the last of duplicate members.
                    fields.retain(|(existing, _)| existing != &name);
                    fields.push((name, raw));
                }
                Ok(ObjectFields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

/// `expires_at` as pydantic reads a datetime: ISO-8601 text or Unix seconds. A datetime
/// without an offset is refused (Airflow fails on it with a 500).
fn parse_expires_at(raw: &RawValue) -> Result<Option<EpochMillis>, ValidationIssue> {
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
            DatetimeProblem::Unparseable => invalid(
                "datetime_from_date_parsing",
                "Input should be a valid datetime or date, invalid datetime format".into(),
            ),
        }),
        _ => Err(invalid("datetime_type", "Input should be a valid datetime".into())),
    }
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

    fn kinds(result: Result<PutBody<'_>, Vec<ValidationIssue>>) -> Vec<&'static str> {
        result.unwrap_err().iter().map(|issue| issue.kind).collect()
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
            ["json_invalid"]
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
                .map_err(|e| e[0].kind)
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
