//! A strict `multipart/form-data` reader (RFC 7578) for the audio operations: enough to find
//! the text fields the model reads (`prompt`) and the `user`, and to refuse any form two parsers
//! could read differently.
//!
//! Refused: a missing, empty, over-long, quoted-with-escapes or repeated `boundary` parameter;
//! a preamble or an epilogue (anything but one CRLF after the closing delimiter); line endings
//! other than CRLF; folded header lines; a part without `Content-Disposition: form-data; name=…`,
//! or with `name`/`filename` twice or in the RFC 2231 `name*=` form; `Content-Transfer-Encoding`
//! or `Content-Encoding` on a part (RFC 7578 deprecates the first; both would hide text); more
//! than [`MAX_PARTS`] parts. The bytes are never rewritten: what was read is what is forwarded.

/// Most parts a form may have (AOAI's audio forms have about ten fields).
pub const MAX_PARTS: usize = 64;
/// Longest header block of one part.
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// One field of the form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub body: &'a [u8],
}

impl Part<'_> {
    /// Whether the part declares a charset other than UTF-8 in its own `Content-Type`: its bytes
    /// would be decoded differently by AOAI than the gate read them, so the gate refuses it.
    pub fn foreign_charset(&self) -> bool {
        let Some(ct) = self.content_type.as_deref() else {
            return false;
        };
        ct.split(';').skip(1).any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("charset")
                    && !is_utf8_label(v.trim().trim_matches('"'))
            })
        })
    }
}

/// `utf-8` or `utf8`, in any case.
pub fn is_utf8_label(label: &str) -> bool {
    let l = label.trim();
    l.eq_ignore_ascii_case("utf-8") || l.eq_ignore_ascii_case("utf8")
}

/// The `boundary` of a `multipart/form-data` content type; `Err` says what is wrong.
pub fn boundary(content_type: &str) -> Result<String, &'static str> {
    let mut params = content_type.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err("the Content-Type is not multipart/form-data");
    }
    let mut found: Option<String> = None;
    for param in params {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let Some((name, value)) = param.split_once('=') else {
            return Err("a Content-Type parameter without a value");
        };
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        if found.is_some() {
            return Err("the boundary parameter appears twice");
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => rest
                .strip_suffix('"')
                .filter(|v| !v.contains(['"', '\\']))
                .ok_or("a badly quoted boundary")?,
            None => value,
        };
        // RFC 2046: 1-70 of these characters, not ending in a space
        let ok = !value.is_empty()
            && value.len() <= 70
            && !value.ends_with(' ')
            && value
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c));
        if !ok {
            return Err("an invalid boundary");
        }
        found = Some(value.to_string());
    }
    found.ok_or("no boundary parameter")
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = from;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&c| c == first) {
            None => return None,
            Some(off) => {
                let at = i + off;
                if &hay[at..at + needle.len()] == needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// Split `body` into parts.
pub fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, &'static str> {
    let delimiter = format!("--{boundary}");
    let next_delimiter = format!("\r\n--{boundary}");
    if !body.starts_with(delimiter.as_bytes()) {
        return Err("the body does not start with the boundary (a preamble, or another boundary)");
    }
    let mut pos = delimiter.len();
    let mut parts = Vec::new();
    loop {
        // after a delimiter: `--` closes the form, CRLF opens a part
        let rest = &body[pos..];
        if let Some(after) = rest.strip_prefix(b"--") {
            if after.is_empty() || after == b"\r\n" {
                return Ok(parts);
            }
            return Err("data after the closing boundary");
        }
        if !rest.starts_with(b"\r\n") {
            return Err("a boundary not followed by CRLF");
        }
        pos += 2;
        if parts.len() == MAX_PARTS {
            return Err("too many parts");
        }
        let header_end = find(body, b"\r\n\r\n", pos)
            .filter(|&e| e - pos <= MAX_HEADER_BYTES)
            .ok_or("a part whose headers do not end")?;
        // a part with no headers at all starts with the blank line
        let headers = &body[pos..header_end];
        let (name, filename, content_type) = part_headers(headers)?;
        let content_start = header_end + 4;
        let end = find(body, next_delimiter.as_bytes(), content_start)
            .ok_or("a part that is not closed by the boundary")?;
        parts.push(Part {
            name,
            filename,
            content_type,
            body: &body[content_start..end],
        });
        pos = end + next_delimiter.len();
    }
}

type PartHeaders = (String, Option<String>, Option<String>);

fn part_headers(block: &[u8]) -> Result<PartHeaders, &'static str> {
    let block = std::str::from_utf8(block).map_err(|_| "part headers that are not UTF-8")?;
    let mut disposition: Option<(String, Option<String>)> = None;
    let mut content_type: Option<String> = None;
    for line in block.split("\r\n") {
        if line.contains(['\r', '\n']) {
            return Err("a bare CR or LF in part headers");
        }
        if line.starts_with([' ', '\t']) {
            return Err("a folded part header");
        }
        let (name, value) = line.split_once(':').ok_or("a part header without ':'")?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-disposition" => {
                if disposition.is_some() {
                    return Err("Content-Disposition twice in one part");
                }
                disposition = Some(content_disposition(value)?);
            }
            "content-type" => {
                if content_type.is_some() {
                    return Err("Content-Type twice in one part");
                }
                content_type = Some(value.to_string());
            }
            "content-transfer-encoding" | "content-encoding" => {
                return Err("an encoded part (Content-Transfer-Encoding or Content-Encoding)")
            }
            _ => {}
        }
    }
    let (name, filename) = disposition.ok_or("a part without Content-Disposition")?;
    Ok((name, filename, content_type))
}

/// `form-data; name="x"; filename="y"`
fn content_disposition(value: &str) -> Result<(String, Option<String>), &'static str> {
    let (kind, mut rest) = match value.find(';') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => (value, ""),
    };
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return Err("a part that is not form-data");
    }
    let (mut name, mut filename) = (None, None);
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let eq = rest
            .find('=')
            .ok_or("a Content-Disposition parameter without '='")?;
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let val;
        if let Some(q) = rest.strip_prefix('"') {
            let close = q.find('"').ok_or("an unterminated quoted parameter")?;
            val = &q[..close];
            if val.contains('\\') {
                return Err("an escaped quoted parameter");
            }
            rest = q[close + 1..].trim_start();
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            val = rest[..end].trim();
            rest = &rest[end..];
        }
        match rest.as_bytes().first() {
            None => {}
            Some(b';') => rest = &rest[1..],
            Some(_) => return Err("junk after a Content-Disposition parameter"),
        }
        let slot = match key.as_str() {
            "name" => &mut name,
            "filename" => &mut filename,
            k if k.ends_with('*') => {
                return Err("an RFC 2231 encoded parameter (name*=, filename*=)")
            }
            _ => continue,
        };
        if slot.is_some() {
            return Err("a Content-Disposition parameter twice");
        }
        *slot = Some(val.to_string());
    }
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or("a part without a name")?;
    Ok((name, filename))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "XyZ";

    fn form(parts: &[&str]) -> Vec<u8> {
        let mut out = String::new();
        for p in parts {
            out.push_str(&format!("--{B}\r\n{p}\r\n"));
        }
        out.push_str(&format!("--{B}--\r\n"));
        out.into_bytes()
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").unwrap(),
            "abc"
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=utf-8; BOUNDARY=\"a b:c\"").unwrap(),
            "a b:c"
        );
        for bad in [
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=a; boundary=b",
            "multipart/form-data; boundary=\"a",
            "multipart/form-data; boundary=a;b",
            "multipart/mixed; boundary=a",
            "application/json",
            "multipart/form-data; boundary=a\u{1}",
        ] {
            assert!(boundary(bad).is_err(), "{bad}");
        }
        assert!(boundary(&format!("multipart/form-data; boundary={}", "a".repeat(71))).is_err());
    }

    #[test]
    fn reads_fields_and_files() {
        let body = form(&[
            "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01--XyZ-not-a-delimiter",
            "Content-Disposition: form-data; name=\"prompt\"\r\n\r\nline one\r\nline two",
            "content-disposition: form-data; name=user\r\n\r\nalice",
            "Content-Disposition: form-data; name=\"empty\"\r\n\r\n",
        ]);
        let parts = parse(&body, B).unwrap();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].filename.as_deref(), Some("a.wav"));
        assert_eq!(parts[0].body, b"RIFF\x00\x01--XyZ-not-a-delimiter");
        assert_eq!(parts[1].body, b"line one\r\nline two");
        assert_eq!(
            (parts[2].name.as_str(), parts[2].body),
            ("user", &b"alice"[..])
        );
        assert_eq!(parts[3].body, b"");
        assert_eq!(parse(format!("--{B}--").as_bytes(), B).unwrap(), vec![]);
    }

    #[test]
    fn refuses_ambiguous_forms() {
        let ok = "Content-Disposition: form-data; name=\"prompt\"\r\n\r\nhi";
        let good = form(&[ok]);
        assert!(parse(&good, B).is_ok());
        let mut preamble = b"preamble\r\n".to_vec();
        preamble.extend_from_slice(&good);
        let mut epilogue = good.clone();
        epilogue.extend_from_slice(b"trailing");
        let lf_only = String::from_utf8(good.clone())
            .unwrap()
            .replace("\r\n", "\n");
        let unclosed = format!("--{B}\r\n{ok}");
        for (body, what) in [
            (preamble, "preamble"),
            (epilogue, "epilogue"),
            (lf_only.into_bytes(), "LF only"),
            (unclosed.into_bytes(), "unclosed"),
            (form(&["Content-Disposition: form-data\r\n\r\nx"]), "no name"),
            (form(&["Content-Type: text/plain\r\n\r\nx"]), "no disposition"),
            (form(&["Content-Disposition: attachment; name=\"a\"\r\n\r\nx"]), "not form-data"),
            (form(&["Content-Disposition: form-data; name=\"a\"; name=\"b\"\r\n\r\nx"]), "name twice"),
            (form(&["Content-Disposition: form-data; name*=UTF-8''prompt\r\n\r\nx"]), "rfc 2231"),
            (form(&["Content-Disposition: form-data; name=\"prompt\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGk="]), "cte"),
            (form(&["Content-Disposition: form-data;\r\n name=\"prompt\"\r\n\r\nx"]), "folded"),
            (form(&["Content-Disposition: form-data; name=\"a\\\"b\"\r\n\r\nx"]), "escaped quote"),
            (form(&["Content-Disposition: form-data; name=\"a\"\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\nx"]), "two dispositions"),
        ] {
            assert!(parse(&body, B).is_err(), "{what} must be refused");
        }
        let many: Vec<&str> = std::iter::repeat_n(ok, MAX_PARTS + 1).collect();
        assert_eq!(parse(&form(&many), B).unwrap_err(), "too many parts");
    }
}
