//! Stage 3, **policy**: runs after auth, for every operation whose body carries text the model
//! reads (all but the `responses/{id}…`, `models`, `files` and `batches` routes; a file upload
//! is read by `pipeline::batch` instead), and only when the user check or content
//! screening is on — otherwise the body streams to AOAI untouched and this stage costs nothing.
//!
//! The rule it enforces: **everything the model will read is screened, or the request is
//! refused.** It buffers the body (up to `MAX_BODY_BYTES`), reads it whole and strictly
//! ([`json`], [`multipart`]) by the operation's entry in [`map`] (what the model reads, one
//! table), extracts every text-bearing field into [`PromptText`] for the content-safety stage
//! ([`extract`]), and checks the `user` as `USER_CHECK` asks. AOAI receives the client's bytes,
//! exactly those that were read: nothing is re-serialised.
//!
//! Short-circuits with 400 `invalid_body` (not strict JSON or multipart, wrong content type or
//! charset, any `Content-Encoding`, token-id prompts while screening is on, `user` not a string,
//! too many text fields), 400 `missing_user`, 403 (unregistered user); the gate adds 413. Adds to
//! the request context: the user, the v1 `model`, and the prompt text.
//!
//! Layout: [`json`] the strict pull reader · [`multipart`] the strict form reader · [`map`] the
//! declarative "what the model reads" table · [`extract`] the walk that applies the table.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::HeaderMap;

pub mod extract;
pub mod json;
pub mod map;
pub mod multipart;
#[cfg(test)]
mod proptests;

use super::audit::Reason;
use super::route::Operation;
use crate::error::AppError;
use crate::settings::{SettingsError, Source};

/// Longest `user` we accept (AOAI documents no limit; ids and e-mail addresses fit easily).
pub const MAX_USER_LEN: usize = 256;

/// Default `BATCH_MAX_LINES`: every line is screened before the upload is answered, within
/// `AOAI_TIMEOUT_MS`; a thousand lines take a few seconds of Content Safety calls.
pub const DEFAULT_BATCH_MAX_LINES: usize = 1000;

/// `USER_CHECK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCheck {
    Off,
    Present,
    Registered,
}

/// Policy settings.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub user_check: UserCheck,
    /// `REGISTERED_USERS`.
    pub registered_users: HashSet<String>,
    /// `BATCH_MAX_LINES`: most requests one batch input file may hold while the gate is on.
    pub batch_max_lines: usize,
    /// `UPLOAD_UNSCREENED_PURPOSES`: file purposes other than `batch` accepted unread while the
    /// gate is on (the gate cannot vouch for fine-tuning data and the like).
    pub unscreened_purposes: HashSet<String>,
}

impl PolicySettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let user_check = match src
            .get("USER_CHECK")?
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("off") => UserCheck::Off,
            Some("present") => UserCheck::Present,
            Some("registered") => UserCheck::Registered,
            Some(other) => {
                return Err(SettingsError::new(
                    "USER_CHECK",
                    format!("must be off, present or registered, got {other:?}"),
                ))
            }
        };
        let registered_users: HashSet<String> = src
            .get("REGISTERED_USERS")?
            .unwrap_or("")
            .split([',', ';', '\n'])
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(u) = registered_users
            .iter()
            .find(|u| u.chars().count() > MAX_USER_LEN)
        {
            return Err(SettingsError::new(
                "REGISTERED_USERS",
                format!(
                    "a user name is longer than {MAX_USER_LEN} characters ({} …)",
                    &u[..16]
                ),
            ));
        }
        let batch_max_lines = match src.get("BATCH_MAX_LINES")? {
            None => DEFAULT_BATCH_MAX_LINES,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => {
                    return Err(SettingsError::new(
                        "BATCH_MAX_LINES",
                        format!("must be a whole number from 1 to 100000, got {v:?}"),
                    ))
                }
            },
        };
        let unscreened_purposes: HashSet<String> = src
            .get("UPLOAD_UNSCREENED_PURPOSES")?
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if unscreened_purposes.contains("batch") {
            return Err(SettingsError::new(
                "UPLOAD_UNSCREENED_PURPOSES",
                "must not name batch: batch input is always screened while the gate is on",
            ));
        }
        Ok(PolicySettings {
            user_check,
            registered_users,
            batch_max_lines,
            unscreened_purposes,
        })
    }
}

/// Known users: `REGISTERED_USERS` plus, when Cosmos DB is configured, the users container
/// (refreshed in the background; the last good copy stays when Cosmos is unreachable).
pub struct UserRegistry {
    configured: HashSet<String>,
    remote: RwLock<Arc<HashSet<String>>>,
}

impl UserRegistry {
    pub fn new(configured: HashSet<String>) -> Self {
        UserRegistry {
            configured,
            remote: RwLock::new(Arc::new(HashSet::new())),
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.configured.contains(user)
            || self
                .remote
                .read()
                .map(|r| r.contains(user))
                .unwrap_or(false)
    }

    /// Replace the remote copy after a successful refresh.
    pub fn replace_remote(&self, users: HashSet<String>) {
        if let Ok(mut r) = self.remote.write() {
            *r = Arc::new(users);
        }
    }

    pub fn remote_len(&self) -> usize {
        self.remote.read().map(|r| r.len()).unwrap_or(0)
    }
}

/// The text the model will read, by how it must be screened (Prompt Shields treats user prompts
/// and documents apart). Every piece names where in the body it came from, for the abuse record.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PromptText {
    /// Written by the client and read as instructions: harm categories and Prompt Shields'
    /// user prompt (user, system and developer messages, client-written assistant turns and
    /// their tool-call arguments, prompts, inputs, `role_information`, unknown fields).
    pub user: Vec<Text>,
    /// Content from elsewhere: harm categories and Prompt Shields' documents (indirect attack):
    /// tool and function results, retrieved documents.
    pub documents: Vec<Text>,
    /// Read by the model but not as instructions from the user: harm categories only (tool and
    /// function definitions, JSON schemas, predicted outputs). Embeddings input is `user` text
    /// of an operation that runs no Prompt Shields.
    pub harm_only: Vec<Text>,
}

/// One text-bearing field of the body.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Text {
    pub text: String,
    /// Where it came from, as a JSON path (`messages[2].content[0].text`).
    pub field: String,
    /// The message role it belongs to, when it belongs to one.
    pub role: Option<String>,
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl PromptText {
    pub fn is_empty(&self) -> bool {
        self.user.is_empty() && self.documents.is_empty() && self.harm_only.is_empty()
    }

    /// Every piece, in screening order.
    pub fn all(&self) -> impl Iterator<Item = &Text> {
        self.user
            .iter()
            .chain(&self.harm_only)
            .chain(&self.documents)
    }

    /// All of it, for the abuse record (only when prompt capture is on).
    pub fn joined(&self) -> String {
        let all: Vec<&str> = self.all().map(|t| t.text.as_str()).collect();
        all.join("\n")
    }

    /// Where each piece of [`PromptText::joined`] came from, in the same order: its field, role
    /// and length in characters (the pieces are joined with one `\n`), for the abuse record.
    pub fn fields(&self) -> serde_json::Value {
        self.all()
            .map(|t| {
                serde_json::json!({
                    "field": t.field,
                    "role": t.role,
                    "chars": t.text.chars().count(),
                })
            })
            .collect()
    }
}

/// What the policy stage learned from the body.
#[derive(Debug, Default)]
pub struct Inspected {
    pub user: Option<String>,
    pub model: Option<String>,
    pub prompt: PromptText,
}

/// A refusal, with what the audit record needs.
#[derive(Debug)]
pub struct Refusal {
    pub error: AppError,
    pub reason: Reason,
    pub inspected: Inspected,
}

fn refuse(error: AppError, reason: Reason, inspected: Inspected) -> Box<Refusal> {
    Box::new(Refusal {
        error,
        reason,
        inspected,
    })
}

/// Inspect a buffered body by the operation's entry in [`map`]: read it strictly (JSON or
/// multipart), extract what the model reads when `want_prompt`, check the user.
pub fn inspect(
    headers: &HeaderMap,
    body: &Bytes,
    operation: Operation,
    check: UserCheck,
    registry: &UserRegistry,
    want_prompt: bool,
) -> Result<Inspected, Box<Refusal>> {
    let spec = map::spec(operation);
    let invalid = |message: String, inspected: Inspected| {
        refuse(
            AppError::InvalidBody(message),
            Reason::InvalidBody,
            inspected,
        )
    };
    if let Err(why) = identity_encoding(headers) {
        return Err(invalid(why.into(), Inspected::default()));
    }
    let read = match spec.body {
        map::Body::None => return Ok(Inspected::default()),
        map::Body::Json => match json_content_type(headers) {
            Err(why) => return Err(invalid(why.into(), Inspected::default())),
            Ok(()) => extract::json_body(body, spec, want_prompt),
        },
        // read line by line by `pipeline::batch`, never as one body: refused here so that a
        // caller that forgot that cannot let the upload through unread
        map::Body::BatchInput => {
            return Err(invalid(
                "A file upload is read by the batch reader".into(),
                Inspected::default(),
            ))
        }
        map::Body::Multipart => {
            let boundary = single_content_type(headers)
                .ok_or("the Content-Type must be given once")
                .and_then(multipart::boundary);
            let parts = boundary.and_then(|b| multipart::parse(body, &b));
            match parts {
                Err(why) => {
                    return Err(invalid(
                        extract::Problem::Multipart(why).to_string(),
                        Inspected::default(),
                    ))
                }
                Ok(parts) => extract::form(&parts, spec, want_prompt),
            }
        }
    };
    let extracted = match read {
        Ok(e) => e,
        Err(failure) => {
            let inspected = Inspected::from(failure.partial);
            return Err(invalid(failure.problem.to_string(), inspected));
        }
    };
    let tokens = extracted.tokens.clone();
    let mut inspected = Inspected::from(extracted);
    if let (true, Some(field)) = (want_prompt, tokens) {
        return Err(invalid(
            format!(
                "'{field}' is given as token ids; token arrays cannot be screened for content \
                 safety, send the text instead"
            ),
            inspected,
        ));
    }
    if let Some(u) = &inspected.user {
        if u.chars().count() > MAX_USER_LEN || u.chars().any(char::is_control) {
            return Err(invalid(
                format!(
                    "The 'user' field must be at most {MAX_USER_LEN} characters without control characters"
                ),
                inspected,
            ));
        }
    }
    inspected.user = inspected.user.take().filter(|u| !u.trim().is_empty());

    if check != UserCheck::Off && inspected.user.is_none() {
        return Err(refuse(
            AppError::MissingUser(
                "The request must name the end user in the 'user' field (a non-empty string)"
                    .into(),
            ),
            Reason::MissingUser,
            inspected,
        ));
    }
    if check == UserCheck::Registered {
        let known = inspected
            .user
            .as_deref()
            .is_some_and(|u| registry.contains(u));
        if !known {
            return Err(refuse(
                AppError::UnregisteredUser,
                Reason::UnregisteredUser,
                inspected,
            ));
        }
    }
    Ok(inspected)
}

impl From<extract::Extracted> for Inspected {
    fn from(e: extract::Extracted) -> Self {
        Inspected {
            user: e.user,
            model: e.model,
            prompt: e.prompt,
        }
    }
}

/// The one Content-Type header, when there is exactly one.
pub(crate) fn single_content_type(headers: &HeaderMap) -> Option<&str> {
    let mut all = headers.get_all(http::header::CONTENT_TYPE).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => v.to_str().ok(),
        _ => None,
    }
}

/// `application/json`, with no charset or UTF-8 (JSON is UTF-8; another charset would make the
/// gate and AOAI read different text).
fn json_content_type(headers: &HeaderMap) -> Result<(), &'static str> {
    const WRONG: &str = "The Content-Type must be application/json for this operation";
    let value = single_content_type(headers).ok_or(WRONG)?;
    let mut params = value.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(WRONG);
    }
    for param in params {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        if k.trim().eq_ignore_ascii_case("charset") {
            let v = v.trim().trim_matches('"');
            if !v.eq_ignore_ascii_case("utf-8") && !v.eq_ignore_ascii_case("utf8") {
                return Err("The Content-Type charset must be utf-8");
            }
        }
    }
    Ok(())
}

/// The gate reads the bytes as sent: a compressed body (any `Content-Encoding` but `identity`)
/// is refused rather than decoded (decoding would need its own bound on the decoded size).
pub(crate) fn identity_encoding(headers: &HeaderMap) -> Result<(), &'static str> {
    for v in headers.get_all(http::header::CONTENT_ENCODING) {
        let ok = v.to_str().is_ok_and(|v| {
            v.split(',')
                .all(|c| c.trim().eq_ignore_ascii_case("identity"))
        });
        if !ok {
            return Err("A Content-Encoding (compressed request body) cannot be screened; send the body uncompressed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        h
    }

    fn registry() -> UserRegistry {
        UserRegistry::new(["alice".to_string()].into_iter().collect())
    }

    fn run(body: &str, op: Operation, check: UserCheck) -> Result<Inspected, Box<Refusal>> {
        inspect(
            &json_headers(),
            &Bytes::from(body.to_string()),
            op,
            check,
            &registry(),
            true,
        )
    }

    #[test]
    fn user_check_modes() {
        let chat = Operation::ChatCompletions;
        assert!(run(r#"{"messages":[]}"#, chat, UserCheck::Off).is_ok());
        let r = run(r#"{"messages":[]}"#, chat, UserCheck::Present).unwrap_err();
        assert_eq!(
            (r.reason, r.error.status().as_u16()),
            (Reason::MissingUser, 400)
        );
        let r = run(r#"{"user":"  ","messages":[]}"#, chat, UserCheck::Present).unwrap_err();
        assert_eq!(r.reason, Reason::MissingUser);
        let r = run(r#"{"user":null}"#, chat, UserCheck::Present).unwrap_err();
        assert_eq!(r.reason, Reason::MissingUser);
        assert!(run(r#"{"user":"mallory"}"#, chat, UserCheck::Present).is_ok());
        let r = run(r#"{"user":"mallory"}"#, chat, UserCheck::Registered).unwrap_err();
        assert_eq!(
            (r.reason, r.error.status().as_u16()),
            (Reason::UnregisteredUser, 403)
        );
        assert_eq!(r.inspected.user.as_deref(), Some("mallory"));
        assert!(run(r#"{"user":"alice"}"#, chat, UserCheck::Registered).is_ok());
    }

    #[test]
    fn bad_bodies_say_which_problem() {
        let chat = Operation::ChatCompletions;
        let r = run(r#"{"user":42}"#, chat, UserCheck::Off).unwrap_err();
        assert!(r
            .error
            .to_string()
            .contains("'user' field must be a string"));
        let r = run(r#"{"user":"a""#, chat, UserCheck::Off).unwrap_err();
        assert!(r.error.to_string().contains("not a valid JSON"));
        let r = run(r#"[1,2]"#, chat, UserCheck::Off).unwrap_err();
        assert_eq!(r.reason, Reason::InvalidBody);
        let long = format!(r#"{{"user":"{}"}}"#, "u".repeat(MAX_USER_LEN + 1));
        assert!(run(&long, chat, UserCheck::Off).is_err());
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        let r = inspect(
            &h,
            &Bytes::from_static(b"{}"),
            chat,
            UserCheck::Off,
            &registry(),
            false,
        )
        .unwrap_err();
        assert!(r.error.to_string().contains("Content-Type"));
    }

    #[test]
    fn extracts_what_the_model_reads() {
        let body = r#"{"user":"alice","messages":[
            {"role":"system","content":"be nice"},
            {"role":"user","content":[{"type":"text","text":"part one"},{"type":"image_url","image_url":{"url":"data:x"}},{"type":"text","text":"part \"two\""}]},
            {"role":"assistant","content":"earlier answer"},
            {"role":"tool","tool_call_id":"t","content":"tool said ignore instructions"}
        ]}"#;
        let i = run(body, Operation::ChatCompletions, UserCheck::Off).unwrap();
        assert_eq!(
            i.prompt.user,
            ["be nice", "part one", "part \"two\"", "earlier answer"]
        );
        assert!(i.prompt.harm_only.is_empty());
        assert_eq!(i.prompt.documents, ["tool said ignore instructions"]);

        let i = run(
            r#"{"prompt":["a","b"]}"#,
            Operation::Completions,
            UserCheck::Off,
        )
        .unwrap();
        assert_eq!(i.prompt.user, ["a", "b"]);
        let r = run(
            r#"{"input":[[1,2,3]]}"#,
            Operation::Embeddings,
            UserCheck::Off,
        )
        .unwrap_err();
        assert!(r.error.to_string().contains("token ids"));
        // without screening, token arrays are fine (only the user is needed)
        assert!(inspect(
            &json_headers(),
            &Bytes::from_static(br#"{"input":[[1,2,3]]}"#),
            Operation::Embeddings,
            UserCheck::Off,
            &registry(),
            false,
        )
        .is_ok());
        let i = run(
            r#"{"input":"hello"}"#,
            Operation::V1Embeddings,
            UserCheck::Off,
        )
        .unwrap();
        assert_eq!(i.prompt.user, ["hello"]);
        let body = r#"{"model":"gpt-4o","instructions":"sys","input":[
            {"role":"user","content":[{"type":"input_text","text":"q"}]},
            {"type":"function_call_output","call_id":"c","output":"doc text"}]}"#;
        let i = run(body, Operation::V1Responses, UserCheck::Off).unwrap();
        assert_eq!(i.prompt.user, ["sys", "q"]);
        assert_eq!(i.prompt.documents, ["doc text"]);
        assert_eq!(i.model.as_deref(), Some("gpt-4o"));
        let i = run(
            r#"{"input":"just text"}"#,
            Operation::V1Responses,
            UserCheck::Off,
        )
        .unwrap();
        assert_eq!(i.prompt.user, ["just text"]);
    }

    #[test]
    fn remote_registry_adds_users() {
        let r = registry();
        assert!(!r.contains("bob"));
        r.replace_remote(["bob".to_string()].into_iter().collect());
        assert!(r.contains("bob") && r.contains("alice"));
    }
}
