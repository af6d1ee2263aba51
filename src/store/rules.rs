//! What the store accepts as a key and a value: the Execution API's rules, which every
//! way in applies alike (HTTP requests, `airstate import`, a metastore migration). The
//! messages are Airflow's, so an import reports a bad record the way the API would.

use super::pyjson;

/// Airflow stores keys in `VARCHAR(512)`.
pub const MAX_KEY_CHARS: usize = 512;

/// Why a key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("String should have at least 1 character")]
    Empty,
    #[error("String should have at most {MAX_KEY_CHARS} characters")]
    TooLong,
    /// Airflow's database refuses it (a 500); no store key, and no asset name or URI in a
    /// metastore, can be addressed with it. `loc` says which parameter held it.
    #[error("Value error, the text cannot contain the NUL character (U+0000)")]
    Nul,
}

/// Why a value is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueProblem {
    /// Only from [`check_value_text`]: a request body is parsed before its value is seen.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// Nested deeper than pydantic validates: the path below the value to the first
    /// element too deep, and that element's text.
    #[error("Recursion error - maximum validation depth exceeded")]
    TooDeep(Vec<serde_json::Value>, String),
    #[error("Value error, value cannot be null")]
    Null,
    /// Airflow stores it, then fails every read (UTF-8 cannot hold it).
    #[error(
        "Value error, value holds a lone UTF-16 surrogate ({0}), which cannot be stored as UTF-8"
    )]
    LoneSurrogate(String),
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
    } else if key.contains('\0') {
        Err(KeyProblem::Nul)
    } else {
        Ok(())
    }
}

/// The text of a value already read as JSON: too deep for pydantic, `null` (Airflow:
/// "value cannot be null"), a lone surrogate, or a non-finite number anywhere are
/// refused. Airflow answers 500 for a top-level non-finite number and stores a nested
/// one that later breaks every read.
pub fn check_value(text: &str) -> Result<(), ValueProblem> {
    let facts = pyjson::facts_of(text);
    if let Some((path, span)) = facts.too_deep {
        return Err(ValueProblem::TooDeep(path, text[span].to_owned()));
    }
    if text == "null" {
        return Err(ValueProblem::Null);
    }
    if let Some(escape) = facts.lone_surrogate {
        return Err(ValueProblem::LoneSurrogate(escape));
    }
    if facts.non_finite {
        return Err(ValueProblem::NotFinite);
    }
    Ok(())
}

/// [`check_value`] for JSON text that did not come in a request (`airstate import`).
pub fn check_value_text(text: &str) -> Result<(), ValueProblem> {
    match pyjson::parse_document(text) {
        Ok(_) => check_value(text.trim_matches([' ', '\t', '\n', '\r'])),
        Err(pyjson::SyntaxError::Decode { msg, pos }) => {
            Err(ValueProblem::NotJson(format!("{msg}: char {pos}")))
        }
        Err(pyjson::SyntaxError::TooDeep) => Err(ValueProblem::NotJson("nested too deep".into())),
        Err(pyjson::SyntaxError::IntegerTooLong) => Err(ValueProblem::NotJson(format!(
            "an integer of more than {} digits",
            pyjson::PYTHON_MAX_INT_DIGITS
        ))),
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
