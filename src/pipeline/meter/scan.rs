//! The meter's one pass over a JSON answer: where its top-level `usage` and `response` members
//! sit, validating every byte it skips, without building anything.
//!
//! [`super::usage_of`] reads an answer exactly as `serde_json::from_slice` into
//! `{ usage: Option<RawUsage>, response: Option<{ usage }> }` did: an answer that is not valid
//! JSON, or names either member twice at top level, yields no usage. serde_json walked the whole
//! answer through its visitor machinery to get there (~14.6 k instructions for the bench's
//! 948-byte chat answer); this scanner walks it once with the same grammar, and serde_json then
//! reads only the two members' values (a few hundred bytes at most).
//!
//! The grammar of what is skipped is serde_json's `ignore_value` (1.0.x), byte for byte:
//! whitespace is space, `\n`, `\t`, `\r`; strings refuse raw control characters (< 0x20) and
//! escapes other than `\" \\ \/ \b \f \n \r \t \uXXXX` (any four hex digits: an unpaired
//! surrogate in a *skipped* string is accepted, as serde_json accepts it there), and their bytes
//! are not checked as UTF-8 (serde_json does not check skipped strings either); numbers are
//! `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`; literals `true`, `false`, `null`.
//!
//! Whatever this pass does not decide on its own it answers [`Scan::Unsure`], and the caller
//! reads the answer the old way (serde_json whole): a top level that is not an object (serde
//! reads a struct from an array too), a top-level name with an escape, a non-ASCII byte or a
//! control character (serde unescapes and validates names: `"us\u0061ge"` *is* `usage`), and
//! nesting deeper than [`MAX_DEPTH`]. None of these occurs in an AOAI answer, so the fallback
//! costs nothing in practice and keeps the semantics exact by construction.

/// What one pass found.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan<'a> {
    /// Valid JSON object; the raw bytes of the `usage` and `response` values, when present (each
    /// at most once).
    Members {
        usage: Option<&'a [u8]>,
        response: Option<&'a [u8]>,
    },
    /// Not valid JSON, or `usage` / `response` twice at top level: no usage.
    Invalid,
    /// Outside what this pass decides: read it with serde_json.
    Unsure,
}

/// Deepest nesting the pass follows (a bit per level in a `u128`); deeper goes to serde_json.
pub const MAX_DEPTH: u32 = 127;

enum Stop {
    Invalid,
    Unsure,
}

/// Find the top-level `usage` and `response` members of `json` (see the module doc).
pub fn top_level(json: &[u8]) -> Scan<'_> {
    match members(json) {
        Ok((usage, response)) => Scan::Members { usage, response },
        Err(Stop::Invalid) => Scan::Invalid,
        Err(Stop::Unsure) => Scan::Unsure,
    }
}

type Found<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

fn members(b: &[u8]) -> Result<Found<'_>, Stop> {
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Err(Stop::Unsure);
    }
    let (mut usage, mut response) = (None, None);
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return Err(Stop::Invalid);
            }
            let start = i + 1;
            let mut j = start;
            loop {
                match b.get(j) {
                    None => return Err(Stop::Invalid),
                    Some(b'"') => break,
                    Some(&c) if (0x20..0x80).contains(&c) && c != b'\\' => j += 1,
                    Some(_) => return Err(Stop::Unsure),
                }
            }
            let name = &b[start..j];
            i = ws(b, j + 1);
            if b.get(i) != Some(&b':') {
                return Err(Stop::Invalid);
            }
            let from = ws(b, i + 1);
            i = skip_value(b, from)?;
            let slot = match name {
                b"usage" => Some(&mut usage),
                b"response" => Some(&mut response),
                _ => None,
            };
            if let Some(slot) = slot {
                if slot.replace(&b[from..i]).is_some() {
                    return Err(Stop::Invalid); // serde: duplicate field
                }
            }
            i = ws(b, i);
            match b.get(i) {
                Some(b',') => i = ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return Err(Stop::Invalid),
            }
        }
    }
    if ws(b, i) != b.len() {
        return Err(Stop::Invalid);
    }
    Ok((usage, response))
}

/// The first index at or after `i` that is not JSON whitespace.
#[inline(always)]
fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Skip one value starting at `i` (no leading whitespace); the index just after it.
fn skip_value(b: &[u8], mut i: usize) -> Result<usize, Stop> {
    // One bit per open container: 1 = object, 0 = array.
    let mut stack: u128 = 0;
    let mut depth: u32 = 0;
    loop {
        // a value
        match b.get(i) {
            Some(b'n') => i = literal(b, i, b"null")?,
            Some(b't') => i = literal(b, i, b"true")?,
            Some(b'f') => i = literal(b, i, b"false")?,
            Some(b'-' | b'0'..=b'9') => i = number(b, i)?,
            Some(b'"') => i = string(b, i + 1)?,
            Some(&open @ (b'[' | b'{')) => {
                if depth == MAX_DEPTH {
                    return Err(Stop::Unsure);
                }
                stack = (stack << 1) | u128::from(open == b'{');
                depth += 1;
                i = ws(b, i + 1);
                let close = if open == b'{' { b'}' } else { b']' };
                if b.get(i) == Some(&close) {
                    i += 1;
                    depth -= 1;
                    stack >>= 1;
                } else {
                    if open == b'{' {
                        i = key(b, i)?;
                    }
                    continue;
                }
            }
            _ => return Err(Stop::Invalid),
        }
        // after a value: a comma or the end of the enclosing container(s)
        loop {
            if depth == 0 {
                return Ok(i);
            }
            let object = stack & 1 == 1;
            i = ws(b, i);
            match b.get(i) {
                Some(b',') => {
                    i = ws(b, i + 1);
                    if object {
                        i = key(b, i)?;
                    }
                    break;
                }
                Some(b'}') if object => {}
                Some(b']') if !object => {}
                _ => return Err(Stop::Invalid),
            }
            i += 1;
            depth -= 1;
            stack >>= 1;
        }
    }
}

/// A member name and its colon inside a skipped object, at `i`; the index of its value.
#[inline(always)]
fn key(b: &[u8], i: usize) -> Result<usize, Stop> {
    if b.get(i) != Some(&b'"') {
        return Err(Stop::Invalid);
    }
    let i = ws(b, string(b, i + 1)?);
    if b.get(i) != Some(&b':') {
        return Err(Stop::Invalid);
    }
    Ok(ws(b, i + 1))
}

#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Result<usize, Stop> {
    if b.len() >= i + word.len() && &b[i..i + word.len()] == word {
        Ok(i + word.len())
    } else {
        Err(Stop::Invalid)
    }
}

#[inline(always)]
fn digits(b: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?` at `i`; the index after it.
#[inline(always)]
fn number(b: &[u8], mut i: usize) -> Result<usize, Stop> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => {
            i += 1;
            if let Some(b'0'..=b'9') = b.get(i) {
                return Err(Stop::Invalid);
            }
        }
        Some(b'1'..=b'9') => i = digits(b, i + 1),
        _ => return Err(Stop::Invalid),
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(b, i + 1);
        if end == i + 1 {
            return Err(Stop::Invalid);
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(b, i);
        if end == i {
            return Err(Stop::Invalid);
        }
        i = end;
    }
    Ok(i)
}

const ONES: u64 = u64::MAX / 255;
const HIGH: u64 = ONES << 7;

/// The bytes of `w` that end a plain run of string text: `"`, `\` or a control character (the
/// lowest set flag is exact; flags above it may be spurious).
#[inline(always)]
fn specials(w: u64) -> u64 {
    let ctrl = w.wrapping_sub(ONES * 0x20) & !w;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let s = w ^ (ONES * u64::from(b'\\'));
    let slash = s.wrapping_sub(ONES) & !s;
    (ctrl | quote | slash) & HIGH
}

/// The rest of a string whose opening quote is before `i`; the index after its closing quote.
#[inline(always)]
fn string(b: &[u8], mut i: usize) -> Result<usize, Stop> {
    loop {
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            let m = specials(w);
            if m != 0 {
                i += m.trailing_zeros() as usize / 8;
                break;
            }
            i += 8;
        }
        match b.get(i) {
            None => return Err(Stop::Invalid),
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match b.get(i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                Some(b'u') => match b.get(i + 2..i + 6) {
                    Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => i += 6,
                    _ => return Err(Stop::Invalid),
                },
                _ => return Err(Stop::Invalid),
            },
            Some(&c) if c < 0x20 => return Err(Stop::Invalid),
            Some(_) => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<'a>(usage: Option<&'a str>, response: Option<&'a str>) -> Scan<'a> {
        Scan::Members {
            usage: usage.map(str::as_bytes),
            response: response.map(str::as_bytes),
        }
    }

    #[test]
    fn finds_the_members_and_only_at_top_level() {
        let s = br#" {"id":"x","choices":[{"message":{"usage":1,"content":"\"usage\":{}"}}],"usage" : {"total_tokens":3} } "#;
        assert_eq!(top_level(s), m(Some(r#"{"total_tokens":3}"#), None));
        assert_eq!(
            top_level(br#"{"response":{"usage":null}}"#),
            m(None, Some(r#"{"usage":null}"#))
        );
        assert_eq!(top_level(b"{}"), m(None, None));
        assert_eq!(top_level(br#"{"usage":null}"#), m(Some("null"), None));
    }

    #[test]
    fn refuses_what_serde_refuses() {
        for bad in [
            &br#"{"usage":1,"usage":2}"#[..],
            br#"{"response":1,"response":null}"#,
            br#"{"a":1,}"#,
            br#"{"a":[1,]}"#,
            br#"{"a":01}"#,
            br#"{"a":1.}"#,
            br#"{"a":1e}"#,
            br#"{"a":-}"#,
            br#"{"a":"\x"}"#,
            br#"{"a":"\u12g4"}"#,
            b"{\"a\":\"\x01\"}",
            br#"{"a":nul}"#,
            br#"{"a":1} x"#,
            br#"{"a":{"b"}}"#,
            br#"{"a":{"b":1,}}"#,
            br#"{"a":[}"#,
            br#"{"a":1"#,
            br#"{"a""#,
        ] {
            assert_eq!(
                top_level(bad),
                Scan::Invalid,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn leaves_to_serde_what_it_does_not_decide() {
        for unsure in [
            &br#"[{"total_tokens":1}]"#[..],
            br#""usage""#,
            b"",
            br#"{"us\u0061ge":{}}"#,
            "{\"usagé\":1}".as_bytes(),
        ] {
            assert_eq!(
                top_level(unsure),
                Scan::Unsure,
                "{}",
                String::from_utf8_lossy(unsure)
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(top_level(deep.as_bytes()), Scan::Unsure);
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(120), "]".repeat(120));
        assert_eq!(top_level(ok.as_bytes()), m(None, None));
    }
}
