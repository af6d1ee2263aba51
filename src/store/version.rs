//! Versions and conditional writes (optimistic concurrency).
//!
//! Every write gives the value a fresh random version, stored in the value's own
//! bookkeeping prefix, so a read is still one `HGET` and a key that is deleted and
//! recreated never gets an old version back (no ABA). The HTTP layer serves the version
//! as the `ETag`; a [`Condition`] built from `If-Match` / `If-None-Match` is checked
//! against the current version in the same atomic step as the write.

/// A new version: 64 random bits as 16 lower-case hex digits.
pub fn new_version() -> String {
    let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{high:016x}")
}

/// Whether a version may travel to the Lua scripts: versions we mint are hex, and the
/// legacy form is `L<digits>`; anything else can never match and is dropped early.
pub fn is_version(text: &str) -> bool {
    !text.is_empty() && text.len() <= 32 && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The version of a value written before versions existed: derived from its write time.
/// Only one such value can exist per key (any write replaces it with a minted version).
pub fn legacy_version(updated_at: i64) -> String {
    format!("L{updated_at}")
}

/// One precondition list: `*` (any current version) or specific versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tags {
    Any,
    /// May be empty: then nothing matches.
    Listed(Vec<String>),
}

impl Tags {
    fn matches(&self, current: &str) -> bool {
        match self {
            Tags::Any => true,
            Tags::Listed(tags) => tags.iter().any(|tag| tag == current),
        }
    }

    /// The form the Lua scripts read: `*`, or `,v1,v2,` (`,` alone when empty).
    fn to_arg(&self) -> String {
        match self {
            Tags::Any => "*".to_owned(),
            Tags::Listed(tags) => {
                let mut out = String::from(",");
                for tag in tags.iter().filter(|tag| is_version(tag)) {
                    out.push_str(tag);
                    out.push(',');
                }
                out
            }
        }
    }
}

/// `If-Match` / `If-None-Match` as the store evaluates them (RFC 9110 §13.2.2 order:
/// `If-Match` first, then `If-None-Match`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condition {
    /// The key must exist with one of these versions.
    pub if_match: Option<Tags>,
    /// The key must not exist (`*`) or not have one of these versions.
    pub if_none_match: Option<Tags>,
}

impl Condition {
    /// No precondition: the write always applies (Airflow's last-write-wins).
    pub const NONE: Condition = Condition {
        if_match: None,
        if_none_match: None,
    };

    pub fn is_none(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }

    /// Whether the write may go ahead over a key whose current version is `current`
    /// (`None`: the key does not exist or has expired).
    pub fn allows(&self, current: Option<&str>) -> bool {
        if let Some(tags) = &self.if_match {
            match current {
                Some(version) if tags.matches(version) => {}
                _ => return false,
            }
        }
        if let Some(tags) = &self.if_none_match {
            if let Some(version) = current {
                if tags.matches(version) {
                    return false;
                }
            }
        }
        true
    }

    /// The two script arguments: (if-match, if-none-match), `""` when absent.
    pub fn to_args(&self) -> (String, String) {
        let arg = |tags: &Option<Tags>| tags.as_ref().map(Tags::to_arg).unwrap_or_default();
        (arg(&self.if_match), arg(&self.if_none_match))
    }
}

/// What a conditional write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Applied; a set carries the new version, a delete `None`.
    Applied(Option<String>),
    /// The condition did not hold; nothing changed.
    PreconditionFailed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(tags: &[&str]) -> Option<Tags> {
        Some(Tags::Listed(tags.iter().map(|t| t.to_string()).collect()))
    }

    #[test]
    fn conditions_follow_rfc_9110() {
        let none = Condition::NONE;
        assert!(none.allows(None) && none.allows(Some("a")));
        let create_only = Condition {
            if_none_match: Some(Tags::Any),
            ..Condition::default()
        };
        assert!(create_only.allows(None));
        assert!(!create_only.allows(Some("a")));
        let exists = Condition {
            if_match: Some(Tags::Any),
            ..Condition::default()
        };
        assert!(!exists.allows(None) && exists.allows(Some("a")));
        let one_of = Condition {
            if_match: listed(&["a", "b"]),
            ..Condition::default()
        };
        assert!(one_of.allows(Some("b")));
        assert!(!one_of.allows(Some("c")) && !one_of.allows(None));
        let not_these = Condition {
            if_none_match: listed(&["a"]),
            ..Condition::default()
        };
        assert!(not_these.allows(None) && not_these.allows(Some("b")));
        assert!(!not_these.allows(Some("a")));
    }

    #[test]
    fn script_arguments_drop_what_cannot_match() {
        let condition = Condition {
            if_match: listed(&["ab12", "x,y", ""]),
            if_none_match: Some(Tags::Any),
        };
        assert_eq!(condition.to_args(), (",ab12,".into(), "*".into()));
        assert_eq!(Condition::NONE.to_args(), (String::new(), String::new()));
        assert_eq!(
            Condition {
                if_match: listed(&[]),
                ..Condition::default()
            }
            .to_args()
            .0,
            ","
        );
    }

    #[test]
    fn versions_are_unique_hex() {
        let a = new_version();
        assert_eq!(a.len(), 16);
        assert!(is_version(&a));
        assert_ne!(a, new_version());
    }
}
