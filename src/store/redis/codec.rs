//! How a value and its bookkeeping are stored in one hash field.

use fred::prelude::*;

use super::super::version::legacy_version;
use super::super::{EpochMillis, StoreError, StoreResult, StoredValue};
use super::RedisStore;

/// `"<updated_ms>.<version>:<expires_ms or empty>:<json>"`: bookkeeping in front of the
/// JSON text, so one `HGET` returns everything a read needs. Values written before
/// versions existed lack `.<version>`; they read with a [`legacy_version`].
pub(super) fn encode(
    json: &str,
    updated_at: EpochMillis,
    version: &str,
    expires_at: Option<EpochMillis>,
) -> String {
    match expires_at {
        Some(at) => format!("{updated_at}.{version}:{at}:{json}"),
        None => format!("{updated_at}.{version}::{json}"),
    }
}

pub(super) fn decode(raw: String) -> StoreResult<StoredValue> {
    let corrupt = || StoreError::Internal("stored value has an unknown encoding".to_owned());
    let (updated, rest) = raw.split_once(':').ok_or_else(corrupt)?;
    let (expires, json) = rest.split_once(':').ok_or_else(corrupt)?;
    let (updated, version) = match updated.split_once('.') {
        Some((updated, version)) => (updated, Some(version.to_owned())),
        None => (updated, None),
    };
    let updated_at = updated.parse().map_err(|_| corrupt())?;
    let version = version.unwrap_or_else(|| legacy_version(updated_at));
    let expires_at = if expires.is_empty() {
        None
    } else {
        Some(expires.parse().map_err(|_| corrupt())?)
    };
    let json_start = raw.len() - json.len();
    let mut json = raw;
    json.drain(..json_start);
    Ok(StoredValue {
        json,
        updated_at,
        expires_at,
        version,
    })
}

/// HGETALL's reply as pairs, whatever order Redis gave.
pub(super) fn pairs(map: std::collections::HashMap<String, String>) -> Vec<(String, String)> {
    map.into_iter().collect()
}

impl RedisStore {
    /// Many fields of one hash, decoded, in one call (`bulk_read.lua`); `None` for a
    /// missing field. Refused, with nothing read, when the stored values total more than
    /// `max_bytes`. A task scope passes its registry and its field there, `(registry,
    /// "m<map_index>")`: a scope a clear-all left stale reads as empty.
    pub(super) async fn read_many(
        &self,
        hash: &str,
        registry: Option<(&str, &str)>,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<Value> = Vec::with_capacity(keys.len() + 2);
        let limit = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        args.push(limit.into());
        let mut declared = vec![hash.to_owned()];
        match registry {
            Some((registry, field)) => {
                declared.push(registry.to_owned());
                args.push(field.into());
            }
            None => args.push("".into()),
        }
        args.extend(keys.iter().map(|key| Value::from(key.as_str())));
        let client = self.redis.shared_client();
        let mut reply: Vec<Value> = self
            .redis
            .eval(
                "bulk_read",
                &self.scripts.bulk_read,
                &client,
                &declared,
                &args,
            )
            .await?;
        let total = reply.first().and_then(Value::as_i64).unwrap_or(0);
        if reply.len() == 1 && total > limit {
            return Err(StoreError::TooLarge {
                bytes: total as u64,
                limit: max_bytes as u64,
            });
        }
        if reply.len() != keys.len() + 1 {
            return Err(StoreError::Internal(format!(
                "bulk read of {} fields returned {}",
                keys.len(),
                reply.len().saturating_sub(1)
            )));
        }
        reply
            .drain(1..)
            .map(|value| match value {
                Value::Null => Ok(None),
                value => value
                    .into_string()
                    .ok_or_else(|| StoreError::Internal("a value that is not UTF-8".into()))
                    .and_then(decode)
                    .map(Some),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_json_text_untouched() {
        for (json, expires) in [
            ("1.0", None),
            ("\"a:b::c\"", Some(1_700_000_000_123)),
            ("123456789012345678901234567890", None),
            ("{\"k\": [1, 2]}", Some(5)),
        ] {
            let decoded = decode(encode(json, 42, "00ff", expires)).unwrap();
            assert_eq!(decoded.json, json);
            assert_eq!(decoded.version, "00ff");
            assert_eq!(decoded.updated_at, 42);
            assert_eq!(decoded.expires_at, expires);
        }
    }

    #[test]
    fn values_from_before_versions_still_decode() {
        let decoded = decode("42::\"a:b\"".to_owned()).unwrap();
        assert_eq!(decoded.json, "\"a:b\"");
        assert_eq!(decoded.version, legacy_version(42));
        let decoded = decode("42:7:1".to_owned()).unwrap();
        assert_eq!(
            (decoded.expires_at, decoded.version.as_str()),
            (Some(7), "L42")
        );
    }

    #[test]
    fn undecodable_values_are_errors_not_panics() {
        for raw in ["", "nocolon", "x::1", "1:y:2"] {
            assert!(decode(raw.to_owned()).is_err(), "{raw:?} decoded");
        }
    }
}
