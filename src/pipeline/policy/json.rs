//! A strict, pull-style JSON reader for the gate: it visits every value of a body exactly once,
//! builds no tree, and refuses what other parsers read differently.
//!
//! Why not serde_json: it keeps the *last* of two duplicate keys (AOAI's parser may keep the
//! first), and its `RawValue` path never looks inside the values it skips, so a nested duplicate,
//! a lone surrogate or a too-deep value in a part the gate skipped reached AOAI unread. Here every
//! byte is read by one state machine, and a body is refused (never half-read) when it has:
//! - a duplicate key in any object, at any depth, compared after unescaping (`"r\u006fle"` is
//!   `"role"`);
//! - an invalid escape, a lone or reversed UTF-16 surrogate (`"\ud800"`), a raw control
//!   character in a string, or bytes that are not UTF-8;
//! - nesting deeper than [`MAX_DEPTH`];
//! - anything after the top-level value but whitespace, a byte-order mark, or a number outside
//!   the JSON grammar (`01`, `1.`, `+1`, `NaN`).

use std::borrow::Cow;
use std::collections::HashSet;

/// Deepest nesting accepted. System.Text.Json (what Azure's .NET front ends use) stops at 64 by
/// default; tool schemas in real requests stay far below it.
pub const MAX_DEPTH: usize = 64;

/// One step of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Token<'a> {
    ObjStart,
    ObjEnd,
    ArrStart,
    ArrEnd,
    /// An object key, unescaped; the value follows as the next token.
    Key(Cow<'a, str>),
    Str(Cow<'a, str>),
    /// The number as written (already checked against the grammar).
    Num(&'a str),
    Bool(bool),
    Null,
}

/// Why the body is not strict JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Byte offset into the body.
    pub offset: usize,
    pub what: &'static str,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.offset)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// a value is due (top level, after `:`, after `,` in an array)
    Value,
    /// just after `[`: a value or `]`
    ValueOrEnd,
    /// just after `{`: a key or `}`
    KeyOrEnd,
    /// after `,` in an object
    Key,
    /// after a complete value: `,`, a closer, or the end of the document
    After,
}

/// Most keys one object may have. The duplicate check remembers every key of an open object;
/// without a bound a body of tiny keys would cost several times its size in memory. Real
/// bodies stay far below (`logit_bias` allows 300 entries, `metadata` 16).
pub const MAX_KEYS: usize = 10_000;

/// Keys seen in one open object: a short list searched linearly, a set past [`SET_FROM`] keys.
struct Keys<'a> {
    list: Vec<Cow<'a, str>>,
    set: Option<HashSet<Cow<'a, str>>>,
}

const SET_FROM: usize = 16;

impl<'a> Keys<'a> {
    fn new() -> Self {
        Keys {
            list: Vec::new(),
            set: None,
        }
    }

    fn len(&self) -> usize {
        self.set.as_ref().map_or(self.list.len(), HashSet::len)
    }

    /// false when `key` was already there
    fn insert(&mut self, key: Cow<'a, str>) -> bool {
        if let Some(set) = self.set.as_mut() {
            return set.insert(key);
        }
        if self.list.contains(&key) {
            return false;
        }
        self.list.push(key);
        if self.list.len() >= SET_FROM {
            self.set = Some(self.list.drain(..).collect());
        }
        true
    }
}

enum Frame<'a> {
    Arr,
    Obj(Keys<'a>),
}

/// The reader. Call [`Parser::next`] until the top-level value is complete, then
/// [`Parser::finish`]; or [`validate`] a whole document.
pub struct Parser<'a> {
    src: &'a str,
    pos: usize,
    state: State,
    stack: Vec<Frame<'a>>,
    started: bool,
}

fn err<T>(offset: usize, what: &'static str) -> Result<T, Error> {
    Err(Error { offset, what })
}

impl<'a> Parser<'a> {
    /// Refuses bytes that are not UTF-8 (and a byte-order mark) before reading anything.
    pub fn new(bytes: &'a [u8]) -> Result<Self, Error> {
        let src = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => return err(e.valid_up_to(), "bytes that are not UTF-8"),
        };
        if src.starts_with('\u{feff}') {
            return err(0, "a byte-order mark");
        }
        Ok(Parser {
            src,
            pos: 0,
            state: State::Value,
            stack: Vec::new(),
            started: false,
        })
    }

    /// Byte offset of the next unread byte.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// Whether the top-level value is complete.
    pub fn done(&self) -> bool {
        self.started && self.stack.is_empty() && self.state == State::After
    }

    fn skip_ws(&mut self) {
        let b = self.src.as_bytes();
        while self.pos < b.len() && matches!(b[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    /// After the top-level value: only whitespace may follow.
    pub fn finish(mut self) -> Result<(), Error> {
        if !self.done() {
            return err(self.pos, "an incomplete document");
        }
        self.skip_ws();
        if self.pos != self.src.len() {
            return err(self.pos, "data after the JSON document");
        }
        Ok(())
    }

    /// The next token. After the top-level value is complete, an error.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Token<'a>, Error> {
        loop {
            self.skip_ws();
            let at = self.pos;
            let Some(c) = self.peek() else {
                return err(at, "an unexpected end of the document");
            };
            match self.state {
                State::After => {
                    let top_is_obj = match self.stack.last() {
                        None => return err(at, "data after the JSON document"),
                        Some(Frame::Obj(_)) => true,
                        Some(Frame::Arr) => false,
                    };
                    self.pos += 1;
                    match (c, top_is_obj) {
                        (b',', true) => self.state = State::Key,
                        (b',', false) => self.state = State::Value,
                        (b'}', true) => return Ok(self.close(Token::ObjEnd)),
                        (b']', false) => return Ok(self.close(Token::ArrEnd)),
                        _ => return err(at, "an unexpected character after a value"),
                    }
                }
                State::KeyOrEnd | State::Key => {
                    if c == b'}' && self.state == State::KeyOrEnd {
                        self.pos += 1;
                        return Ok(self.close(Token::ObjEnd));
                    }
                    if c != b'"' {
                        return err(at, "an object key that is not a string");
                    }
                    let key = self.string()?;
                    self.skip_ws();
                    if self.peek() != Some(b':') {
                        return err(self.pos, "a missing ':' after an object key");
                    }
                    self.pos += 1;
                    let Some(Frame::Obj(keys)) = self.stack.last_mut() else {
                        return err(at, "an object key outside an object");
                    };
                    if keys.len() >= MAX_KEYS {
                        return err(at, "an object with more than 10,000 keys");
                    }
                    if !keys.insert(key.clone()) {
                        return err(at, "a duplicate key");
                    }
                    self.state = State::Value;
                    return Ok(Token::Key(key));
                }
                State::Value | State::ValueOrEnd => {
                    if c == b']' && self.state == State::ValueOrEnd {
                        self.pos += 1;
                        return Ok(self.close(Token::ArrEnd));
                    }
                    if self.started && self.stack.is_empty() {
                        return err(at, "data after the JSON document");
                    }
                    self.started = true;
                    return self.value(c);
                }
            }
        }
    }

    fn close(&mut self, token: Token<'a>) -> Token<'a> {
        self.stack.pop();
        self.state = State::After;
        token
    }

    fn open(
        &mut self,
        frame: Frame<'a>,
        state: State,
        token: Token<'a>,
    ) -> Result<Token<'a>, Error> {
        if self.stack.len() >= MAX_DEPTH {
            return err(self.pos, "nesting deeper than 64 levels");
        }
        self.pos += 1;
        self.stack.push(frame);
        self.state = state;
        Ok(token)
    }

    fn value(&mut self, c: u8) -> Result<Token<'a>, Error> {
        let at = self.pos;
        match c {
            b'{' => return self.open(Frame::Obj(Keys::new()), State::KeyOrEnd, Token::ObjStart),
            b'[' => return self.open(Frame::Arr, State::ValueOrEnd, Token::ArrStart),
            _ => {}
        }
        let token = match c {
            b'"' => Token::Str(self.string()?),
            b'-' | b'0'..=b'9' => Token::Num(self.number()?),
            b't' => self.literal("true", Token::Bool(true))?,
            b'f' => self.literal("false", Token::Bool(false))?,
            b'n' => self.literal("null", Token::Null)?,
            _ => return err(at, "a character that starts no JSON value"),
        };
        self.state = State::After;
        Ok(token)
    }

    fn literal(&mut self, word: &'static str, token: Token<'a>) -> Result<Token<'a>, Error> {
        if self.src[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(token)
        } else {
            err(self.pos, "an invalid literal")
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<&'a str, Error> {
        let b = self.src.as_bytes();
        let start = self.pos;
        let mut i = self.pos;
        let digits = |i: &mut usize| {
            let from = *i;
            while *i < b.len() && b[*i].is_ascii_digit() {
                *i += 1;
            }
            *i - from
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return err(i, "an invalid number"),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if digits(&mut i) == 0 {
                return err(i, "an invalid number");
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return err(i, "an invalid number");
            }
        }
        // `01`, `1x`: a number must end at a delimiter
        if b.get(i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'.')
        {
            return err(i, "an invalid number");
        }
        self.pos = i;
        Ok(&self.src[start..i])
    }

    /// A string starting at `"`; borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, Error> {
        let b = self.src.as_bytes();
        let start = self.pos + 1;
        let mut i = plain_run(b, start);
        // fast path: no escapes
        while i < b.len() {
            match b[i] {
                b'"' => {
                    self.pos = i + 1;
                    return Ok(Cow::Borrowed(&self.src[start..i]));
                }
                b'\\' => break,
                c if c < 0x20 => return err(i, "a control character inside a string"),
                _ => i += 1,
            }
        }
        let mut out = String::with_capacity(i - start + 16);
        out.push_str(&self.src[start..i]);
        loop {
            let Some(&c) = b.get(i) else {
                return err(i, "an unterminated string");
            };
            match c {
                b'"' => {
                    self.pos = i + 1;
                    return Ok(Cow::Owned(out));
                }
                b'\\' => {
                    let esc = b.get(i + 1).copied();
                    i += 2;
                    match esc {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let hi = self.hex4(i)?;
                            i += 4;
                            let ch = match hi {
                                0xD800..=0xDBFF => {
                                    if b.get(i) != Some(&b'\\') || b.get(i + 1) != Some(&b'u') {
                                        return err(i, "a lone surrogate escape");
                                    }
                                    let lo = self.hex4(i + 2)?;
                                    if !(0xDC00..=0xDFFF).contains(&lo) {
                                        return err(i, "a lone surrogate escape");
                                    }
                                    i += 6;
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                }
                                0xDC00..=0xDFFF => return err(i, "a lone surrogate escape"),
                                cp => cp,
                            };
                            match char::from_u32(ch) {
                                Some(ch) => out.push(ch),
                                None => return err(i, "an invalid escape"),
                            }
                        }
                        _ => return err(i - 2, "an invalid escape"),
                    }
                }
                c if c < 0x20 => return err(i, "a control character inside a string"),
                _ => {
                    // copy the run up to the next quote, backslash or control byte
                    let from = i;
                    i = plain_run(b, i);
                    while i < b.len() && b[i] != b'"' && b[i] != b'\\' && b[i] >= 0x20 {
                        i += 1;
                    }
                    out.push_str(&self.src[from..i]);
                }
            }
        }
    }

    fn hex4(&self, at: usize) -> Result<u32, Error> {
        let Some(h) = self.src.get(at..at + 4) else {
            return err(at, "an invalid \\u escape");
        };
        if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return err(at, "an invalid \\u escape");
        }
        u32::from_str_radix(h, 16).or_else(|_| err(at, "an invalid \\u escape"))
    }

    /// Consume one whole value (the next token starts it), checking it as strictly as the rest.
    pub fn skip_value(&mut self) -> Result<(), Error> {
        let first = self.next()?;
        self.skip_from(first)
    }

    /// Consume the rest of a value whose first token was already read.
    pub fn skip_from(&mut self, first: Token<'a>) -> Result<(), Error> {
        let mut depth: usize = match first {
            Token::ObjStart | Token::ArrStart => 1,
            Token::ObjEnd | Token::ArrEnd | Token::Key(_) => {
                return err(self.pos, "a value where none was expected")
            }
            _ => return Ok(()),
        };
        while depth > 0 {
            match self.next()? {
                Token::ObjStart | Token::ArrStart => depth += 1,
                Token::ObjEnd | Token::ArrEnd => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The index of the first byte at or after `i` that may end a plain run of string content (a
/// quote, a backslash or a control byte), or a little before it: eight bytes are checked at a
/// time (base64 images make strings of megabytes), the caller finishes byte by byte.
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while i + 8 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
        let quote = w ^ (ONES * b'"' as u64);
        let backslash = w ^ (ONES * b'\\' as u64);
        // a zero byte in `quote`/`backslash`, or a byte below 0x20 in `w` (high bit clear)
        let hit = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (w.wrapping_sub(ONES * 0x20) & !w);
        if hit & HIGH != 0 {
            return i;
        }
        i += 8;
    }
    i
}

/// Check a whole document; `Ok` when it is strict JSON.
pub fn validate(bytes: &[u8]) -> Result<(), Error> {
    let mut p = Parser::new(bytes)?;
    p.skip_value()?;
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        validate(s.as_bytes()).is_ok()
    }

    fn why(s: &str) -> &'static str {
        validate(s.as_bytes()).unwrap_err().what
    }

    #[test]
    fn accepts_what_json_allows() {
        for s in [
            "{}",
            "[]",
            " { \"a\" : [1, -0, 0.5, 1e3, -2E-7, true, false, null, \"x\"] } ",
            r#"{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}]}"#,
            r#"{"s":"\u00e9\ud83d\ude00\n\t\"\\\/"}"#,
            "\"just a string\"",
            "42",
        ] {
            assert!(ok(s), "{s}");
        }
    }

    #[test]
    fn duplicate_keys_at_any_depth_even_escaped() {
        assert_eq!(why(r#"{"a":1,"a":2}"#), "a duplicate key");
        assert_eq!(
            why(r#"{"m":[{"role":"user","role":"system"}]}"#),
            "a duplicate key"
        );
        assert_eq!(
            why(r#"{"m":[{"x":{"y":[{"role":1,"r\u006fle":2}]}}]}"#),
            "a duplicate key"
        );
        // the same key in sibling objects is fine
        assert!(ok(r#"{"m":[{"role":1},{"role":2}],"x":{"role":3}}"#));
        // many keys: the set path
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        assert!(ok(&format!("{{{}}}", many.join(","))));
        assert_eq!(
            why(&format!("{{{},\"k7\":0}}", many.join(","))),
            "a duplicate key"
        );
    }

    #[test]
    fn keys_per_object_are_bounded() {
        let obj = |n: usize| {
            let keys: Vec<String> = (0..n).map(|i| format!("\"k{i}\":0")).collect();
            format!("{{{}}}", keys.join(","))
        };
        assert!(ok(&obj(MAX_KEYS)));
        assert_eq!(
            why(&obj(MAX_KEYS + 1)),
            "an object with more than 10,000 keys"
        );
        // per object, not per document
        assert!(ok(&format!("[{},{}]", obj(MAX_KEYS), obj(MAX_KEYS))));
    }

    #[test]
    fn bad_strings() {
        assert_eq!(why(r#"{"a":"\ud800"}"#), "a lone surrogate escape");
        assert_eq!(why(r#"{"a":"\udc00\ud800"}"#), "a lone surrogate escape");
        assert_eq!(why(r#"{"a":"\ud800\u0041"}"#), "a lone surrogate escape");
        assert_eq!(why(r#"{"a":"x\ud800"}"#), "a lone surrogate escape");
        assert_eq!(why(r#"{"\ud800":1}"#), "a lone surrogate escape");
        assert_eq!(why(r#"{"a":"\x41"}"#), "an invalid escape");
        assert_eq!(why(r#"{"a":"\u12G4"}"#), "an invalid \\u escape");
        assert_eq!(why(r#"{"a":"\u12"}"#), "an invalid \\u escape");
        assert_eq!(
            why("{\"a\":\"tab\there\"}"),
            "a control character inside a string"
        );
        assert_eq!(why("{\"a\":\"unterminated}"), "an unterminated string");
        assert_eq!(why("{\"a\":\"esc \\"), "an invalid escape");
        assert_eq!(
            validate(b"{\"a\":\"\xff\"}").unwrap_err().what,
            "bytes that are not UTF-8"
        );
        assert_eq!(why("\u{feff}{}"), "a byte-order mark");
    }

    #[test]
    fn bad_structure() {
        for s in [
            "",
            "{",
            "}",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{\"a\" 1}",
            "{1:2}",
            "[1 2]",
            "{}{}",
            "{} x",
            "[}",
            "{]",
            "nul",
            "tru",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "-",
            "NaN",
            "[1]]",
            "{\"a\":1}}",
            "'a'",
        ] {
            assert!(!ok(s), "{s:?} must be refused");
        }
        assert_eq!(why("{} {}"), "data after the JSON document");
    }

    #[test]
    fn depth_is_bounded() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(ok(&deep(MAX_DEPTH)));
        assert_eq!(why(&deep(MAX_DEPTH + 1)), "nesting deeper than 64 levels");
        let objs = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
        assert!(ok(&objs(MAX_DEPTH)));
        assert!(!ok(&objs(MAX_DEPTH + 1)));
        // no stack overflow on absurd depth
        assert!(!ok(&deep(1_000_000)));
    }

    #[test]
    fn tokens_carry_unescaped_text() {
        let mut p = Parser::new(br#"{"k\u0065y":["a\"b",1.5,null]}"#).unwrap();
        let mut all = Vec::new();
        while !p.done() {
            all.push(p.next().unwrap());
        }
        p.finish().unwrap();
        assert_eq!(
            all,
            [
                Token::ObjStart,
                Token::Key("key".into()),
                Token::ArrStart,
                Token::Str("a\"b".into()),
                Token::Num("1.5"),
                Token::Null,
                Token::ArrEnd,
                Token::ObjEnd
            ]
        );
    }
}
