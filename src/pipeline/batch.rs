//! The gate for **file uploads** (`POST files`, both forms): part of the policy stage, run in its
//! place for [`Operation::FileUpload`] when the user check or screening is on.
//!
//! A batch input file is the prompts of many requests, run later by AOAI where no gate sees them.
//! So an upload with `purpose=batch` is read here whole, line by line, before anything reaches
//! AOAI: every line must be a strict JSON object `{"custom_id","method":"POST","url","body"}`
//! whose `url` names an operation this gate serves (chat completions, completions, embeddings,
//! responses), and its `body` goes through [`policy::inspect`] with that operation's entry of the
//! map of what the model reads — the same reading and user check as the online call. The app
//! then screens each line's prompt. A single line that would have been refused online refuses
//! the whole upload (400 `batch_input_refused`, naming the offending `custom_id`s); every such
//! line gets its own abuse record.
//!
//! Other purposes (fine-tuning data, assistants files…) cannot be vouched for: they are refused
//! unless `UPLOAD_UNSCREENED_PURPOSES` names them. Bounded by `MAX_BODY_BYTES` (the upload is
//! buffered like any gated body) and `BATCH_MAX_LINES`.

use std::collections::HashSet;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::audit::Reason;
use super::policy::json::{Parser, Token};
use super::policy::{self, multipart, Inspected, PolicySettings, Refusal, UserRegistry};
use super::route::Operation;
use crate::error::AppError;

/// Longest `custom_id` accepted (AOAI's examples use `task-0`…; ids are echoed in refusals).
pub const MAX_CUSTOM_ID_LEN: usize = 128;
/// How many offending `custom_id`s a refusal message names (the records have them all).
const NAMED_IN_MESSAGE: usize = 20;

/// One request of a batch input file, read and user-checked.
#[derive(Debug)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    pub custom_id: String,
    pub operation: Operation,
    pub inspected: Inspected,
}

/// What the upload is.
#[derive(Debug)]
pub enum Upload {
    /// A batch input file, every line read: screen the prompt of each line in `lines`; any line
    /// in `refused` (or refused by screening) refuses the upload. Lines the policy refused are
    /// not screened, the others are, so that the answer names every offending line at once.
    Batch {
        lines: Vec<Line>,
        refused: Vec<LineRefusal>,
    },
    /// A purpose `UPLOAD_UNSCREENED_PURPOSES` lets through unread.
    Unscreened { purpose: String },
}

/// One line that would have been refused online.
#[derive(Debug)]
pub struct LineRefusal {
    pub number: usize,
    /// `None` when the line was refused before its `custom_id` could be read.
    pub custom_id: Option<String>,
    pub refusal: Box<Refusal>,
}

/// Why an upload is refused as a whole (its form, its purpose, its size in lines).
#[derive(Debug)]
pub enum Refused {
    Whole(Box<Refusal>),
}

fn whole(message: impl Into<String>) -> Refused {
    Refused::Whole(Box::new(Refusal {
        error: AppError::InvalidBody(message.into()),
        reason: Reason::InvalidBody,
        inspected: Inspected::default(),
    }))
}

/// Read an upload: the multipart envelope strictly, its purpose, and for `batch` every line.
pub fn read_upload(
    headers: &HeaderMap,
    body: &Bytes,
    settings: &PolicySettings,
    registry: &UserRegistry,
    want_prompt: bool,
) -> Result<Upload, Refused> {
    policy::identity_encoding(headers).map_err(whole)?;
    let boundary = policy::single_content_type(headers)
        .ok_or("the Content-Type must be given once")
        .and_then(multipart::boundary)
        .map_err(|w| whole(format!("The multipart/form-data body is malformed: {w}")))?;
    let parts = multipart::parse(body, &boundary)
        .map_err(|w| whole(format!("The multipart/form-data body is malformed: {w}")))?;

    let mut purpose: Option<&[u8]> = None;
    let mut file: Option<&[u8]> = None;
    let mut seen: HashSet<String> = HashSet::new();
    for part in &parts {
        let name = part.name.to_ascii_lowercase();
        if !seen.insert(name.clone()) {
            return Err(whole(format!(
                "The form field '{}' appears more than once (names are compared ignoring case)",
                part.name
            )));
        }
        // A declared charset other than UTF-8 (a `utf-16` file part) would make AOAI read
        // other text than the gate screened.
        if part.foreign_charset() {
            return Err(whole(format!(
                "The form field '{}' declares a charset other than UTF-8",
                part.name
            )));
        }
        match name.as_str() {
            "purpose" => purpose = Some(part.body),
            "file" => file = Some(part.body),
            "expires_after[anchor]" | "expires_after[seconds]" => {}
            _ => {
                return Err(whole(format!(
                "The form field '{}' is not one a file upload takes (purpose, file, expires_after)",
                part.name
            )))
            }
        }
    }
    let purpose = purpose
        .and_then(|p| std::str::from_utf8(p).ok())
        .ok_or_else(|| whole("The upload must have a 'purpose' field"))?;
    let file = file.ok_or_else(|| whole("The upload must have a 'file' field"))?;
    // compared as AOAI may (ignoring case and surrounding space), so no spelling of `batch`
    // passes as another purpose
    let normal = purpose.trim().to_ascii_lowercase();
    if normal != "batch" {
        if settings.unscreened_purposes.contains(&normal) {
            return Ok(Upload::Unscreened { purpose: normal });
        }
        return Err(whole(format!(
            "Files for purpose '{}' cannot be screened by this gateway and are not accepted; \
             only batch input files (purpose=batch) are",
            purpose.chars().take(32).collect::<String>()
        )));
    }
    read_batch_file(file, settings, registry, want_prompt)
}

/// Read a batch input file (JSONL) line by line.
pub fn read_batch_file(
    file: &[u8],
    settings: &PolicySettings,
    registry: &UserRegistry,
    want_prompt: bool,
) -> Result<Upload, Refused> {
    let lines: Vec<(usize, &[u8])> = file
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')))
        .collect();
    if lines.is_empty() {
        return Err(whole("The batch input file has no requests"));
    }
    if lines.len() > settings.batch_max_lines {
        return Err(whole(format!(
            "The batch input file has {} requests; this gateway screens at most {} per file \
             (BATCH_MAX_LINES): split it",
            lines.len(),
            settings.batch_max_lines
        )));
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut read = Vec::with_capacity(lines.len());
    let mut refused = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    for (number, bytes) in lines {
        let bad = |custom_id: Option<String>, message: String| LineRefusal {
            number,
            custom_id,
            refusal: Box::new(Refusal {
                error: AppError::InvalidBody(message),
                reason: Reason::InvalidBody,
                inspected: Inspected::default(),
            }),
        };
        // JSON allows these raw inside strings, but line readers that split on every Unicode
        // line break (Python's `splitlines`) would cut the line there and read other requests
        // than the gate did: they must be written escaped (`\u2028`)
        if std::str::from_utf8(bytes).is_ok_and(|l| l.contains(['\u{85}', '\u{2028}', '\u{2029}']))
        {
            refused.push(bad(
                None,
                "The line has a raw Unicode line separator (U+0085, U+2028 or U+2029); write it \
                 escaped (\\u2028)"
                    .into(),
            ));
            continue;
        }
        let envelope = match envelope(bytes) {
            Ok(e) => e,
            Err((custom_id, why)) => {
                refused.push(bad(custom_id, why));
                continue;
            }
        };
        if !ids.insert(envelope.custom_id.clone()) {
            let id = envelope.custom_id.clone();
            refused.push(bad(Some(id), "The custom_id is used twice".into()));
            continue;
        }
        let body = Bytes::copy_from_slice(envelope.body);
        match policy::inspect(
            &headers,
            &body,
            envelope.operation,
            settings.user_check,
            registry,
            want_prompt,
        ) {
            Ok(inspected) => read.push(Line {
                number,
                custom_id: envelope.custom_id,
                operation: envelope.operation,
                inspected,
            }),
            Err(refusal) => refused.push(LineRefusal {
                number,
                custom_id: Some(envelope.custom_id),
                refusal,
            }),
        }
    }
    Ok(Upload::Batch {
        lines: read,
        refused,
    })
}

struct Envelope<'a> {
    custom_id: String,
    operation: Operation,
    body: &'a [u8],
}

/// The operation a line's `url` names: the ones AOAI's batch runs that this gate screens.
fn line_operation(url: &str) -> Option<Operation> {
    let path = url.strip_prefix("/v1").unwrap_or(url);
    Some(match path.to_ascii_lowercase().as_str() {
        "/chat/completions" => Operation::V1ChatCompletions,
        "/completions" => Operation::V1Completions,
        "/embeddings" => Operation::V1Embeddings,
        "/responses" => Operation::V1Responses,
        _ => return None,
    })
}

/// Read one line's envelope strictly. On error, the `custom_id` when it was read.
fn envelope(line: &[u8]) -> Result<Envelope<'_>, (Option<String>, String)> {
    let mut custom_id = None;
    let fail = |id: &Option<String>, why: String| Err((id.clone(), why));
    let mut p = match Parser::new(line) {
        Ok(p) => p,
        Err(e) => return fail(&custom_id, format!("The line is not valid JSON: {e}")),
    };
    let mut method = None;
    let mut url = None;
    let mut body: Option<&[u8]> = None;
    let mut seen: HashSet<String> = HashSet::new();
    macro_rules! next {
        () => {
            match p.next() {
                Ok(t) => t,
                Err(e) => return fail(&custom_id, format!("The line is not valid JSON: {e}")),
            }
        };
    }
    if next!() != Token::ObjStart {
        return fail(&custom_id, "The line must be a JSON object".into());
    }
    loop {
        let key = match next!() {
            Token::ObjEnd => break,
            Token::Key(k) => k.to_ascii_lowercase(),
            _ => return fail(&custom_id, "The line must be a JSON object".into()),
        };
        if !seen.insert(key.clone()) {
            return fail(
                &custom_id,
                format!("The key '{key}' appears more than once (compared ignoring case)"),
            );
        }
        match key.as_str() {
            "custom_id" | "method" | "url" => {
                let Token::Str(v) = next!() else {
                    return fail(&custom_id, format!("'{key}' must be a string"));
                };
                match key.as_str() {
                    "custom_id" => {
                        if v.is_empty()
                            || v.chars().count() > MAX_CUSTOM_ID_LEN
                            || v.chars().any(char::is_control)
                        {
                            return fail(
                                &custom_id,
                                format!(
                                    "'custom_id' must be 1-{MAX_CUSTOM_ID_LEN} characters without control characters"
                                ),
                            );
                        }
                        custom_id = Some(v.into_owned());
                    }
                    "method" => method = Some(v.into_owned()),
                    _ => url = Some(v.into_owned()),
                }
            }
            "body" => {
                let start = p.offset();
                if let Err(e) = p.skip_value() {
                    return fail(&custom_id, format!("The line is not valid JSON: {e}"));
                }
                let raw = &line[start..p.offset()];
                // the value, without the `:` and whitespace before it
                let from = raw
                    .iter()
                    .position(|b| !matches!(b, b':' | b' ' | b'\t' | b'\r' | b'\n'))
                    .unwrap_or(raw.len());
                body = Some(&raw[from..]);
            }
            other => {
                return fail(
                    &custom_id,
                    format!(
                    "The key '{}' is not one a batch request takes (custom_id, method, url, body)",
                    other.chars().take(32).collect::<String>()
                ),
                )
            }
        }
    }
    if let Err(e) = p.finish() {
        return fail(&custom_id, format!("The line is not valid JSON: {e}"));
    }
    let Some(id) = custom_id.clone() else {
        return fail(&custom_id, "The line has no 'custom_id'".into());
    };
    if method.as_deref() != Some("POST") {
        return fail(&custom_id, "'method' must be \"POST\"".into());
    }
    let Some(operation) = url.as_deref().and_then(line_operation) else {
        return fail(
            &custom_id,
            "'url' must be /chat/completions, /completions, /embeddings or /responses \
             (with or without /v1)"
                .into(),
        );
    };
    let Some(body) = body else {
        return fail(&custom_id, "The line has no 'body'".into());
    };
    Ok(Envelope {
        custom_id: id,
        operation,
        body,
    })
}

/// A line's name in a refusal message.
pub fn line_name(number: usize, custom_id: Option<&str>) -> String {
    match custom_id {
        Some(id) => format!("custom_id '{id}'"),
        None => format!("line {number}"),
    }
}

/// The one answer for an upload refused for some of its lines: `offenders` are (line number,
/// line name, error code of the online refusal), in file order.
pub fn refusal(offenders: &[(usize, String, &'static str)]) -> AppError {
    let named: Vec<String> = offenders
        .iter()
        .take(NAMED_IN_MESSAGE)
        .map(|(_, name, code)| format!("{name} ({code})"))
        .collect();
    let more = offenders.len().saturating_sub(NAMED_IN_MESSAGE);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    AppError::BatchInputRefused(format!(
        "The batch input file was refused: {} of its requests would be refused as online \
         calls: {}{tail}. Nothing was uploaded.",
        offenders.len(),
        named.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::policy::UserCheck;

    fn settings(check: UserCheck) -> PolicySettings {
        PolicySettings {
            user_check: check,
            registered_users: HashSet::new(),
            batch_max_lines: 5,
            unscreened_purposes: ["fine-tune".to_string()].into_iter().collect(),
        }
    }

    fn registry() -> UserRegistry {
        UserRegistry::new(["alice".to_string()].into_iter().collect())
    }

    fn form(purpose: &str, file: &str) -> (HeaderMap, Bytes) {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let body = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\r\n--XyZ--\r\n"
        );
        (h, Bytes::from(body))
    }

    fn line(id: &str, url: &str, body: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"{url}","body":{body}}}"#)
    }

    fn run(purpose: &str, file: &str, check: UserCheck) -> Result<Upload, Refused> {
        let (h, b) = form(purpose, file);
        read_upload(&h, &b, &settings(check), &registry(), true)
    }

    fn refused_ids(r: Result<Upload, Refused>) -> Vec<String> {
        match r {
            Ok(Upload::Batch { refused: ls, .. }) if !ls.is_empty() => ls
                .iter()
                .map(|l| line_name(l.number, l.custom_id.as_deref()))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_line_is_read_by_its_operations_entry() {
        let file = [
            line(
                "a",
                "/chat/completions",
                r#"{"model":"gpt-4o","user":"alice","messages":[{"role":"user","content":"hi there"}]}"#,
            ),
            line(
                "b",
                "/v1/responses",
                r#"{"model":"gpt-4o","user":"alice","input":"tell me","instructions":"be brief"}"#,
            ),
            line(
                "c",
                "/embeddings",
                r#"{"model":"emb","user":"alice","input":["x","y"]}"#,
            ),
        ]
        .join("\n")
            + "\n";
        let Ok(Upload::Batch { lines, refused }) = run("batch", &file, UserCheck::Registered)
        else {
            panic!()
        };
        assert!(refused.is_empty());
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].inspected.prompt.user, ["hi there"]);
        assert_eq!(lines[0].operation, Operation::V1ChatCompletions);
        assert_eq!(lines[1].inspected.prompt.user, ["tell me", "be brief"]);
        assert_eq!(lines[1].inspected.model.as_deref(), Some("gpt-4o"));
        assert_eq!(lines[2].inspected.prompt.user, ["x", "y"]);
        assert_eq!(lines[2].number, 3);
    }

    #[test]
    fn a_line_refused_online_refuses_the_upload_and_is_named() {
        let ok = r#"{"user":"alice","messages":[{"role":"user","content":"hi"}]}"#;
        let file = [
            line("good", "/chat/completions", ok),
            line("nouser", "/chat/completions", r#"{"messages":[]}"#),
            line(
                "stranger",
                "/chat/completions",
                r#"{"user":"bob","messages":[]}"#,
            ),
            line(
                "tokens",
                "/embeddings",
                r#"{"user":"alice","input":[[1,2]]}"#,
            ),
            line(
                "dup",
                "/chat/completions",
                r#"{"user":"alice","user":"bob"}"#,
            ),
        ]
        .join("\r\n");
        assert_eq!(
            refused_ids(run("batch", &file, UserCheck::Registered)),
            [
                "custom_id 'nouser'",
                "custom_id 'stranger'",
                "custom_id 'tokens'",
                "custom_id 'dup'"
            ]
        );
    }

    #[test]
    fn envelopes_the_gate_cannot_vouch_for_are_refused() {
        let ok = r#"{"user":"alice","messages":[]}"#;
        for bad in [
            "not json".to_string(),
            "[1]".to_string(),
            r#"{"custom_id":"x","method":"GET","url":"/chat/completions","body":{}}"#.into(),
            line("x", "/fine_tuning/jobs", ok),
            line("x", "/chat/completions?x=1", ok),
            line("x", "/images/generations", ok),
            r#"{"custom_id":"x","method":"POST","url":"/chat/completions"}"#.into(),
            r#"{"method":"POST","url":"/chat/completions","body":{}}"#.into(),
            format!(
                r#"{{"custom_id":"x","method":"POST","url":"/chat/completions","body":{ok},"Body":{{}}}}"#
            ),
            format!(
                r#"{{"custom_id":"x","method":"POST","url":"/chat/completions","body":{ok},"extra":1}}"#
            ),
            format!(
                r#"{{"custom_id":"x","method":"POST","url":"/chat/completions","body":{ok}}} trailing"#
            ),
            format!(r#"{{"custom_id":"x","method":"POST","url":"/chat/completions","body":{ok}"#),
            format!(r#"{{"custom_id":"","method":"POST","url":"/chat/completions","body":{ok}}}"#),
            format!(r#"{{"custom_id":1,"method":"POST","url":"/chat/completions","body":{ok}}}"#),
            line("x", "/chat/completions", r#""a string""#),
            line(
                "x",
                "/chat/completions",
                r#"{"messages":[{"role":"user","content":"\ud800"}]}"#,
            ),
        ] {
            let r = run("batch", &bad, UserCheck::Off);
            assert!(
                matches!(r, Ok(Upload::Batch { ref refused, ref lines }) if refused.len() == 1 && lines.is_empty()),
                "{bad}: {r:?}"
            );
        }
        // raw Unicode line breaks another line reader would split at
        for sep in ['\u{85}', '\u{2028}', '\u{2029}'] {
            let bad = line(
                "x",
                "/chat/completions",
                &format!(r#"{{"messages":[{{"role":"user","content":"a{sep}b"}}]}}"#),
            );
            assert_eq!(refused_ids(run("batch", &bad, UserCheck::Off)), ["line 1"]);
            // escaped, it is plain text
            let good = line(
                "x",
                "/chat/completions",
                r#"{"messages":[{"role":"user","content":"a\u2028b"}]}"#,
            );
            assert!(
                matches!(run("batch", &good, UserCheck::Off), Ok(Upload::Batch { ref refused, .. }) if refused.is_empty())
            );
        }
        // the same custom_id twice
        let file = [
            line("x", "/chat/completions", ok),
            line("x", "/chat/completions", ok),
        ]
        .join("\n");
        assert_eq!(
            refused_ids(run("batch", &file, UserCheck::Off)),
            ["custom_id 'x'"]
        );
    }

    #[test]
    fn a_part_in_another_charset_is_refused() {
        let good = line(
            "a",
            "/chat/completions",
            r#"{"user":"alice","messages":[]}"#,
        );
        for ct in [
            "application/jsonl; charset=utf-16",
            "text/plain; CHARSET=\"UTF-16LE\"",
            "application/octet-stream; x=1; charset=iso-8859-1",
        ] {
            let (h, body) = form("batch", &good);
            let body = String::from_utf8(body.to_vec())
                .unwrap()
                .replace("application/octet-stream", ct);
            let r = read_upload(
                &h,
                &Bytes::from(body),
                &settings(UserCheck::Registered),
                &registry(),
                true,
            );
            let Err(Refused::Whole(refusal)) = r else {
                panic!("{ct}: accepted")
            };
            assert!(
                matches!(&refusal.error, AppError::InvalidBody(m) if m.contains("charset")),
                "{ct}: {:?}",
                refusal.error
            );
        }
        for ct in [
            "application/jsonl; charset=UTF-8",
            "text/plain; charset=\"utf8\"",
        ] {
            let (h, body) = form("batch", &good);
            let body = String::from_utf8(body.to_vec())
                .unwrap()
                .replace("application/octet-stream", ct);
            let r = read_upload(
                &h,
                &Bytes::from(body),
                &settings(UserCheck::Registered),
                &registry(),
                true,
            );
            assert!(r.is_ok(), "{ct}");
        }
    }

    #[test]
    fn purposes_and_bounds() {
        let ok = line("a", "/chat/completions", r#"{"messages":[]}"#);
        for p in ["batch", "Batch", " BATCH "] {
            assert!(
                matches!(run(p, &ok, UserCheck::Off), Ok(Upload::Batch { ref refused, .. }) if refused.is_empty()),
                "{p}"
            );
        }
        // a spelling of batch never passes unread, even with a bad file
        assert_eq!(
            refused_ids(run("BATCH", "junk", UserCheck::Off)),
            ["line 1"]
        );
        assert!(matches!(
            run("fine-tune", "anything", UserCheck::Off),
            Ok(Upload::Unscreened { .. })
        ));
        for p in ["assistants", "user_data", "", "batchx"] {
            assert!(
                matches!(run(p, &ok, UserCheck::Off), Err(Refused::Whole(_))),
                "{p}"
            );
        }
        let six = (0..6)
            .map(|i| line(&format!("l{i}"), "/chat/completions", r#"{"messages":[]}"#))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(matches!(
            run("batch", &six, UserCheck::Off),
            Err(Refused::Whole(_))
        ));
        assert!(matches!(
            run("batch", "\n\n", UserCheck::Off),
            Err(Refused::Whole(_))
        ));
        // envelope: unknown and repeated fields
        let (mut h, _) = form("batch", &ok);
        let body = Bytes::from(format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"PURPOSE\"\r\n\r\nfine-tune\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n{ok}\r\n--XyZ--\r\n"
        ));
        let s = settings(UserCheck::Off);
        assert!(matches!(
            read_upload(&h, &body, &s, &registry(), true),
            Err(Refused::Whole(_))
        ));
        h.insert("content-encoding", "gzip".parse().unwrap());
        let (_, good) = form("batch", &ok);
        assert!(matches!(
            read_upload(&h, &good, &s, &registry(), true),
            Err(Refused::Whole(_))
        ));
    }

    #[test]
    fn refusal_names_ids_and_counts_the_rest() {
        let offenders: Vec<(usize, String, &str)> = (0..25)
            .map(|i| (i, line_name(i, Some(&format!("t{i}"))), "content_filter"))
            .collect();
        let e = refusal(&offenders);
        let m = e.to_string();
        assert!(
            m.contains("custom_id 't0' (content_filter)") && m.contains("and 5 more"),
            "{m}"
        );
        assert!(!m.contains("'t20'"));
        assert_eq!(
            (e.status().as_u16(), e.code()),
            (400, "batch_input_refused")
        );
    }
}
