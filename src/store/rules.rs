//! What the store accepts as a key and a value: the Execution API's rules, which every
//! way in applies alike (HTTP requests, `airstate import`, a metastore migration). The
//! messages are Airflow's, so an import reports a bad record the way the API would.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Airflow stores keys in `VARCHAR(512)`.
pub const MAX_KEY_CHARS: usize = 512;

/// Why a key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("String should have at least 1 character")]
    Empty,
    #[error("String should have at most {MAX_KEY_CHARS} characters")]
    TooLong,
}

/// Why a value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueProblem {
    /// Only from [`check_value_text`]: a request body is parsed before its value is seen.
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("Value error, value cannot be null")]
    Null,
    #[error("Value error, value must be a finite number; NaN and Inf are not JSON representable")]
    NotFinite,
}

/// Airflow's `[state_store] max_value_storage_bytes`, measured on the JSON text as stored
/// (0: no limit). Airflow's Core REST API enforces it and its Execution API does not, so
/// the admin API and airstate's Core REST API routes apply it, each worded as its caller
/// expects.
pub fn exceeds_value_limit(value: &str, limit: usize) -> bool {
    limit != 0 && value.len() > limit
}

/// What a task scope must name, wherever it comes from (a token's claims, an import
/// line): Airflow's task instances have non-empty ids and a map index of -1 (not mapped)
/// or more. State the API accepts can then always be exported and imported again.
pub fn check_task_identity(
    dag_id: &str,
    run_id: &str,
    task_id: &str,
    map_index: i64,
) -> Result<(), String> {
    for (name, text) in [("dag_id", dag_id), ("run_id", run_id), ("task_id", task_id)] {
        if text.is_empty() {
            return Err(format!("{name} must not be empty"));
        }
    }
    if map_index < -1 {
        return Err(format!("map_index must be -1 or more, not {map_index}"));
    }
    Ok(())
}

/// A key is 1 to [`MAX_KEY_CHARS`] characters (not bytes: Airflow counts characters).
pub fn check_key(key: &str) -> Result<(), KeyProblem> {
    if key.is_empty() {
        Err(KeyProblem::Empty)
    } else if key.chars().count() > MAX_KEY_CHARS {
        Err(KeyProblem::TooLong)
    } else {
        Ok(())
    }
}

/// `null` is refused (Airflow: "value cannot be null"), and so is a non-finite number
/// anywhere in the value: Airflow answers 500 for a top-level one and stores a nested one
/// that later breaks every read.
pub fn check_value(raw: &RawValue) -> Result<(), ValueProblem> {
    let text = raw.get();
    if text == "null" {
        return Err(ValueProblem::Null);
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer
        .deserialize_any(FiniteCheck)
        .map_err(|_| ValueProblem::NotFinite)
}

/// [`check_value`] for JSON text that did not come in a request (`airstate import`).
pub fn check_value_text(text: &str) -> Result<(), ValueProblem> {
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| ValueProblem::NotJson(e.to_string()))?;
    check_value(raw)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_to_512_characters() {
        assert_eq!(check_key(""), Err(KeyProblem::Empty));
        assert_eq!(check_key(&"é".repeat(512)), Ok(()));
        assert_eq!(check_key(&"k".repeat(513)), Err(KeyProblem::TooLong));
    }

    #[test]
    fn values_are_json_not_null_and_finite() {
        assert_eq!(check_value_text("{\"a\": [1, 2.5]}"), Ok(()));
        assert_eq!(check_value_text("null"), Err(ValueProblem::Null));
        assert_eq!(check_value_text("[1, 1e400]"), Err(ValueProblem::NotFinite));
        assert!(matches!(
            check_value_text("{"),
            Err(ValueProblem::NotJson(_))
        ));
    }
}
