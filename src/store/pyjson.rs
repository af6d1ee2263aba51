//! JSON read the way Airflow reads it: Python's `json` module (what FastAPI decodes a
//! body with) and pydantic's validation of a `JsonValue`. serde_json differs in what
//! matters on the wire: it stops at 128 levels, refuses integers beyond a double, and
//! words its errors (and counts positions) its own way. This scanner only checks the
//! text; values stay the text that was sent.
//!
//! It reads text, as `json.loads` reads a `str`: a leading byte order mark is refused here
//! too ("Expecting value"; Python says "Unexpected UTF-8 BOM"). Starlette hands Python the
//! body's bytes, whose decoding `http::body` does: it skips a UTF-8 mark (`utf-8-sig`) and
//! reads UTF-8 only. Python, given bytes, would also guess UTF-16 or UTF-32 from NUL bytes
//! in the first four, accept UTF-8-encoded surrogates (`surrogatepass`), and answer bytes it
//! cannot decode with a `UnicodeDecodeError` (FastAPI's 400, where airstate answers 422
//! `json_invalid`); no Airflow client sends such bodies, so these stay differences.

use std::ops::Range;

use serde_json::Value;

/// The most digits Python turns into an `int` (`sys.int_max_str_digits`, CPython 3.11 and the
/// 3.10.7 / 3.9.14 security releases): a longer integer literal makes `json.loads` raise a
/// `ValueError`, which FastAPI answers 400 "There was an error parsing the body".
pub const PYTHON_MAX_INT_DIGITS: usize = 4300;

/// Nesting at which Python's decoder fails with a `RecursionError` (FastAPI: 400 "There
/// was an error parsing the body"), counted in containers of the whole body: a value of
/// 975 nested arrays, as observed on Airflow 3.3.2's API server (the limit is Python's
/// stack, so it moves a little with the server's middleware).
pub const PYTHON_MAX_CONTAINERS: usize = 975;

/// pydantic validates a `JsonValue` up to this many levels (the value itself is level 1,
/// a scalar or an empty container ends a level); deeper is `recursion_depth_exceeded`.
pub const PYDANTIC_MAX_LEVELS: usize = 254;

/// Python's `json.JSONDecodeError`: its message and the position in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxError {
    Decode {
        msg: &'static str,
        pos: usize,
    },
    /// Nested deeper than Python's decoder goes.
    TooDeep,
    /// An integer of more than [`PYTHON_MAX_INT_DIGITS`] digits.
    IntegerTooLong,
}

/// What validation needs to know of a value's text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Facts {
    /// `NaN`, `Infinity`, or a number beyond a double (Python reads it as `inf`).
    pub non_finite: bool,
    /// The first `\uXXXX` escape of a UTF-16 surrogate without its pair.
    pub lone_surrogate: Option<String>,
    /// pydantic's `recursion_depth_exceeded`: the path below the value (`"list", 0`,
    /// `"dict", key`...) to the first element too deep, and that element's text.
    pub too_deep: Option<(Vec<Value>, Range<usize>)>,
}

/// The members of a top-level object (names decoded, values as text spans), or `None`
/// when the document is valid JSON but no object.
pub type Members = Option<Vec<(String, Range<usize>)>>;

/// Checks a whole document as `json.loads` does, returning the top-level object's members.
pub fn parse_document(text: &str) -> Result<(Members, Facts), SyntaxError> {
    let mut parser = Parser::new(text);
    parser.skip_ws();
    let members = parser.root()?;
    parser.skip_ws();
    if parser.i != parser.s.len() {
        return Err(parser.error("Extra data", parser.i));
    }
    Ok((members, parser.facts))
}

/// The facts of one value's text (already known to be valid JSON).
pub fn facts_of(value: &str) -> Facts {
    let mut parser = Parser::new(value);
    parser.skip_ws();
    let mut path = Vec::new();
    match parser.value(1, &mut path) {
        Ok(()) => parser.facts,
        Err(_) => Facts::default(),
    }
}

struct Parser<'a> {
    text: &'a str,
    s: &'a [u8],
    i: usize,
    containers: usize,
    facts: Facts,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            s: text.as_bytes(),
            i: 0,
            containers: 0,
            facts: Facts::default(),
        }
    }

    fn error(&self, msg: &'static str, byte: usize) -> SyntaxError {
        SyntaxError::Decode {
            msg,
            pos: self.text[..byte].chars().count(),
        }
    }

    fn skip_ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// The top-level value; an object's members are kept (level 1 of the body).
    fn root(&mut self) -> Result<Members, SyntaxError> {
        if self.peek() != Some(b'{') {
            let mut path = Vec::new();
            self.value(1, &mut path)?;
            return Ok(None);
        }
        let mut members = Vec::new();
        self.object(1, &mut Vec::new(), Some(&mut members))?;
        Ok(Some(members))
    }

    fn enter(&mut self) -> Result<(), SyntaxError> {
        self.containers += 1;
        if self.containers > PYTHON_MAX_CONTAINERS {
            return Err(SyntaxError::TooDeep);
        }
        Ok(())
    }

    /// One value at pydantic level `level`, `path` leading to it from the value's root.
    fn value(&mut self, level: usize, path: &mut Vec<Value>) -> Result<(), SyntaxError> {
        let start = self.i;
        if level > PYDANTIC_MAX_LEVELS && self.facts.too_deep.is_none() {
            // Recorded before its elements are read, so that they (all too deep as well)
            // do not each copy their path: that was quadratic in the depth, ~1,000 nested
            // arrays cost ~700 path copies of ~1,000 elements each. The span is completed
            // once the element's end is known.
            self.facts.too_deep = Some((path.clone(), start..start));
            self.value_inner(level, path)?;
            if let Some((_, span)) = &mut self.facts.too_deep {
                span.end = self.i;
            }
            return Ok(());
        }
        self.value_inner(level, path)
    }

    fn value_inner(&mut self, level: usize, path: &mut Vec<Value>) -> Result<(), SyntaxError> {
        let rest = &self.s[self.i..];
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => self.object(level, path, None),
            Some(b'[') => self.array(level, path),
            Some(b'n') if rest.starts_with(b"null") => {
                self.i += 4;
                Ok(())
            }
            Some(b't') if rest.starts_with(b"true") => {
                self.i += 4;
                Ok(())
            }
            Some(b'f') if rest.starts_with(b"false") => {
                self.i += 5;
                Ok(())
            }
            Some(b'N') if rest.starts_with(b"NaN") => {
                self.i += 3;
                self.facts.non_finite = true;
                Ok(())
            }
            Some(b'I') if rest.starts_with(b"Infinity") => {
                self.i += 8;
                self.facts.non_finite = true;
                Ok(())
            }
            Some(b'-') if rest.starts_with(b"-Infinity") => {
                self.i += 9;
                self.facts.non_finite = true;
                Ok(())
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.error("Expecting value", self.i)),
        }
    }

    /// Python's number pattern: `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`; what follows a
    /// partial match is left for the caller to refuse.
    fn number(&mut self) -> Result<(), SyntaxError> {
        let start = self.i;
        let digits = |s: &[u8], mut i: usize| {
            while s.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            i
        };
        let mut i = start;
        if self.s[i] == b'-' {
            i += 1;
        }
        match self.s.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(self.s, i),
            _ => return Err(self.error("Expecting value", start)),
        }
        let mut float = false;
        if self.s.get(i) == Some(&b'.') && self.s.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i = digits(self.s, i + 1);
            float = true;
        }
        if matches!(self.s.get(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(self.s.get(j), Some(b'+' | b'-')) {
                j += 1;
            }
            if self.s.get(j).is_some_and(u8::is_ascii_digit) {
                i = digits(self.s, j);
                float = true;
            }
        }
        // Python reads an integer exactly, up to its digit limit; a float beyond a double
        // is inf.
        if float {
            if !self.text[start..i].parse::<f64>().is_ok_and(f64::is_finite) {
                self.facts.non_finite = true;
            }
        } else if i - start - usize::from(self.s[start] == b'-') > PYTHON_MAX_INT_DIGITS {
            return Err(SyntaxError::IntegerTooLong);
        }
        self.i = i;
        Ok(())
    }

    /// A string starting at the quote; returns it decoded.
    fn string(&mut self) -> Result<String, SyntaxError> {
        let begin = self.i;
        self.i += 1;
        let mut out = String::new();
        loop {
            let chunk_start = self.i;
            while let Some(&b) = self.s.get(self.i) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.i += 1;
            }
            out.push_str(&self.text[chunk_start..self.i]);
            match self.peek() {
                None => return Err(self.error("Unterminated string starting at", begin)),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(begin, &mut out)?,
                Some(_) => return Err(self.error("Invalid control character at", self.i)),
            }
        }
    }

    fn escape(&mut self, begin: usize, out: &mut String) -> Result<(), SyntaxError> {
        let backslash = self.i;
        let Some(&kind) = self.s.get(self.i + 1) else {
            return Err(self.error("Unterminated string starting at", begin));
        };
        self.i += 2;
        let simple = match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4(backslash + 2)?;
                if (0xD800..0xDC00).contains(&unit) && self.s[self.i..].starts_with(b"\\u") {
                    if let Ok(low) = self.hex4(self.i + 2) {
                        if (0xDC00..0xE000).contains(&low) {
                            let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            out.extend(char::from_u32(c));
                            return Ok(());
                        }
                        // Not a pair: the high one stands alone; the next escape is read
                        // on its own.
                        self.i -= 6;
                    }
                }
                match char::from_u32(unit) {
                    Some(c) => out.push(c),
                    None => {
                        if self.facts.lone_surrogate.is_none() {
                            self.facts.lone_surrogate = Some(format!("\\u{unit:04x}"));
                        }
                        out.push('\u{fffd}');
                    }
                }
                return Ok(());
            }
            _ => return Err(self.error("Invalid \\escape", backslash)),
        };
        out.push(simple);
        Ok(())
    }

    /// Four hex digits at `at`; on success the cursor moves past them.
    fn hex4(&mut self, at: usize) -> Result<u32, SyntaxError> {
        let digits = self
            .s
            .get(at..at + 4)
            .filter(|d| d.iter().all(u8::is_ascii_hexdigit));
        let Some(digits) = digits else {
            return Err(self.error("Invalid \\uXXXX escape", at - 1));
        };
        self.i = at + 4;
        Ok(u32::from_str_radix(std::str::from_utf8(digits).unwrap_or("0"), 16).unwrap_or(0))
    }

    fn object(
        &mut self,
        level: usize,
        path: &mut Vec<Value>,
        mut members: Option<&mut Vec<(String, Range<usize>)>>,
    ) -> Result<(), SyntaxError> {
        self.enter()?;
        self.i += 1;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            self.containers -= 1;
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error("Expecting property name enclosed in double quotes", self.i));
            }
            let name = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error("Expecting ':' delimiter", self.i));
            }
            self.i += 1;
            self.skip_ws();
            let start = self.i;
            path.push("dict".into());
            path.push(Value::String(name.clone()));
            self.value(level + 1, path)?;
            path.truncate(path.len() - 2);
            if let Some(members) = members.as_deref_mut() {
                // Python's dict keeps the last value of duplicate members at the place of
                // the first.
                match members.iter_mut().find(|(existing, _)| *existing == name) {
                    Some((_, span)) => *span = start..self.i,
                    None => members.push((name, start..self.i)),
                }
            }
            if self.comma_or_close(b'}')? {
                return Ok(());
            }
        }
    }

    /// After a member or an element: `close` ends its container (`true`), a comma means
    /// another follows (`false`); anything else is Python's delimiter error.
    fn comma_or_close(&mut self, close: u8) -> Result<bool, SyntaxError> {
        self.skip_ws();
        match self.peek() {
            Some(c) if c == close => {
                self.i += 1;
                self.containers -= 1;
                Ok(true)
            }
            Some(b',') => {
                self.i += 1;
                self.skip_ws();
                Ok(false)
            }
            _ => Err(self.error("Expecting ',' delimiter", self.i)),
        }
    }

    fn array(&mut self, level: usize, path: &mut Vec<Value>) -> Result<(), SyntaxError> {
        self.enter()?;
        self.i += 1;
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            self.containers -= 1;
            return Ok(());
        }
        let mut index = 0u64;
        loop {
            path.push("list".into());
            path.push(index.into());
            self.value(level + 1, path)?;
            path.truncate(path.len() - 2);
            index += 1;
            if self.comma_or_close(b']')? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> (&'static str, usize) {
        match parse_document(text) {
            Err(SyntaxError::Decode { msg, pos }) => (msg, pos),
            other => panic!("{text:?}: {other:?}"),
        }
    }

    /// Each as Python 3.11's `json.loads` reports it.
    #[test]
    fn errors_are_pythons() {
        for (text, msg, pos) in [
            ("", "Expecting value", 0),
            (" ", "Expecting value", 1),
            ("{", "Expecting property name enclosed in double quotes", 1),
            ("{\"a\"", "Expecting ':' delimiter", 4),
            ("{\"a\" 1}", "Expecting ':' delimiter", 5),
            ("{\"a\":}", "Expecting value", 5),
            (
                "{\"a\":1,}",
                "Expecting property name enclosed in double quotes",
                7,
            ),
            ("[1,]", "Expecting value", 3),
            ("[1 2]", "Expecting ',' delimiter", 3),
            ("\"abc", "Unterminated string starting at", 0),
            ("\"a\\x\"", "Invalid \\escape", 2),
            ("\"a\\u12\"", "Invalid \\uXXXX escape", 3),
            ("\"a\u{1}\"", "Invalid control character at", 2),
            ("{\"a\":1} x", "Extra data", 8),
            ("-", "Expecting value", 0),
            ("01", "Extra data", 1),
            ("1.", "Extra data", 1),
            ("nul", "Expecting value", 0),
            ("{\"é\": tru}", "Expecting value", 6),
            ("{\"a\":1 \"b\"}", "Expecting ',' delimiter", 7),
            ("[", "Expecting value", 1),
            ("{\"a\":\"b\\", "Unterminated string starting at", 5),
        ] {
            assert_eq!(error(text), (msg, pos), "{text:?}");
        }
    }

    #[test]
    fn facts() {
        assert!(facts_of("[1, NaN]").non_finite);
        assert!(facts_of("1e400").non_finite);
        assert!(!facts_of(&"9".repeat(400)).non_finite);
        assert_eq!(
            facts_of("\"\\ud800\"").lone_surrogate.as_deref(),
            Some("\\ud800")
        );
        assert_eq!(facts_of("\"\\ud83d\\ude00\"").lone_surrogate, None);
        assert_eq!(
            facts_of("\"\\udc00\\ud800\"").lone_surrogate.as_deref(),
            Some("\\udc00")
        );
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(facts_of(&deep(253)).too_deep, None);
        let (loc, span) = facts_of(&deep(254)).too_deep.unwrap();
        assert_eq!(loc.len(), 2 * 254);
        assert_eq!(&deep(254)[span], "1");
        // Deeper, the first element too deep is recorded, with all it holds; its elements
        // are not paths of their own (found by the pyjson fuzz target's speed: each used
        // to copy its path, quadratic in the depth).
        let (loc, span) = facts_of(&deep(974)).too_deep.unwrap();
        assert_eq!(loc.len(), 2 * 254);
        assert_eq!(&deep(974)[span], deep(974 - 254));
        let body = |n: usize| format!("{{\"value\": {}}}", deep(n));
        assert!(parse_document(&body(974)).is_ok());
        assert_eq!(parse_document(&body(975)), Err(SyntaxError::TooDeep));
    }

    /// As `json.loads` of Python 3.11 reads them.
    #[test]
    fn integers_up_to_pythons_digit_limit() {
        let digits = |n: usize| "7".repeat(n);
        for text in [
            digits(4300),
            format!("-{}", digits(4300)),
            format!("{}.5", digits(5000)),
        ] {
            assert!(parse_document(&text).is_ok(), "{}", text.len());
        }
        for text in [
            digits(4301),
            format!("-{}", digits(4301)),
            format!("{{\"value\": [{}]}}", digits(4301)),
        ] {
            assert_eq!(parse_document(&text), Err(SyntaxError::IntegerTooLong));
        }
    }

    #[test]
    fn duplicate_members_keep_the_first_place_and_the_last_value() {
        let text = r#"{"a": 1, "b": 2, "a": 3}"#;
        let (members, _) = parse_document(text).unwrap();
        let members: Vec<_> = members
            .unwrap()
            .into_iter()
            .map(|(name, span)| (name, &text[span]))
            .collect();
        assert_eq!(members, [("a".to_owned(), "3"), ("b".to_owned(), "2")]);
    }
}
