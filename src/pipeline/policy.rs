//! Stage 3, **policy**: runs after auth, for operations whose JSON body carries a prompt
//! (chat, completions, embeddings, responses), and only when the user check or content
//! screening is on — otherwise the body streams to AOAI untouched and this stage costs nothing.
//!
//! Buffers the body (up to `MAX_BODY_BYTES`), parses only the fields it needs as raw JSON slices
//! (no re-serialisation: AOAI receives the client's bytes), and checks the `user` field as
//! `USER_CHECK` asks. Short-circuits with 400 (invalid JSON, wrong content type, missing user,
//! `user` not a string), 403 (unregistered user) and 413. Adds to the request context: the user,
//! the v1 `model`, and the prompt text for the content-safety stage.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::audit::Reason;
use super::route::Operation;
use crate::error::AppError;
use crate::settings::{SettingsError, Source};

/// Longest `user` we accept (AOAI documents no limit; ids and e-mail addresses fit easily).
pub const MAX_USER_LEN: usize = 256;

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
        Ok(PolicySettings {
            user_check,
            registered_users,
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

/// The fields of a request body the gate reads; everything else is skipped unparsed.
#[derive(Deserialize, Default)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
}

/// The text the model will read, by how it must be screened (Prompt Shields treats user prompts
/// and documents apart). Every piece names where in the body it came from, for the abuse record.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PromptText {
    /// Written by the client and read as instructions: harm categories and Prompt Shields'
    /// user prompt (user, system and developer messages, prompts, inputs).
    pub user: Vec<Text>,
    /// Content from elsewhere: harm categories and Prompt Shields' documents (indirect attack):
    /// tool and function results, retrieved documents.
    pub documents: Vec<Text>,
    /// Read by the model but never executed as instructions: harm categories only.
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

/// Inspect a buffered JSON body: parse, extract the prompt (when `want_prompt`), check the user.
pub fn inspect(
    headers: &HeaderMap,
    body: &Bytes,
    operation: Operation,
    check: UserCheck,
    registry: &UserRegistry,
    want_prompt: bool,
) -> Result<Inspected, Box<Refusal>> {
    let mut inspected = Inspected::default();
    if !is_json(headers) {
        return Err(refuse(
            AppError::InvalidBody(
                "The Content-Type must be application/json for this operation".into(),
            ),
            Reason::InvalidBody,
            inspected,
        ));
    }
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            return Err(refuse(
                AppError::InvalidBody(format!(
                    "The request body is not a valid JSON object (line {}, column {})",
                    e.line(),
                    e.column()
                )),
                Reason::InvalidBody,
                inspected,
            ))
        }
    };
    inspected.model = envelope.model.and_then(as_string);

    let user = match envelope.user {
        None => None,
        Some(raw) => match as_string(raw) {
            Some(u) => Some(u),
            None if raw.get() == "null" => None,
            None => {
                return Err(refuse(
                    AppError::InvalidBody("The 'user' field must be a string".into()),
                    Reason::InvalidBody,
                    inspected,
                ))
            }
        },
    };
    if want_prompt {
        inspected.prompt = extract_prompt(&envelope, operation);
    }
    if let Some(u) = &user {
        if u.chars().count() > MAX_USER_LEN || u.chars().any(char::is_control) {
            return Err(refuse(
                AppError::InvalidBody(format!(
                    "The 'user' field must be at most {MAX_USER_LEN} characters without control characters"
                )),
                Reason::InvalidBody,
                inspected,
            ));
        }
    }
    inspected.user = user.filter(|u| !u.trim().is_empty());

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

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

fn as_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

fn text(text: String, field: String, role: Option<&str>) -> Text {
    Text {
        text,
        field,
        role: role.map(str::to_string),
    }
}

/// Strings, or arrays of strings (token arrays and other shapes are not text and are skipped).
fn strings(raw: &RawValue, field: &str, role: Option<&str>, out: &mut Vec<Text>) {
    if let Some(s) = as_string(raw) {
        out.push(text(s, field.to_string(), role));
    } else if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
        for (i, item) in items.into_iter().enumerate() {
            if let Some(s) = as_string(item) {
                out.push(text(s, format!("{field}[{i}]"), role));
            }
        }
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default)]
    role: Option<String>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    /// responses API: `function_call_output` items carry `output`
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// Message content: a string, or an array of parts whose text parts we keep.
fn content_text(raw: &RawValue, field: &str, role: Option<&str>, out: &mut Vec<Text>) {
    if let Some(s) = as_string(raw) {
        out.push(text(s, field.to_string(), role));
        return;
    }
    if let Ok(parts) = serde_json::from_str::<Vec<Part>>(raw.get()) {
        for (i, p) in parts.into_iter().enumerate() {
            let is_text = matches!(
                p.kind.as_deref(),
                Some("text" | "input_text" | "output_text") | None
            );
            if let (true, Some(t)) = (is_text, p.text) {
                out.push(text(t, format!("{field}[{i}].text"), role));
            }
        }
    }
}

fn messages(raw: &RawValue, field: &str, prompt: &mut PromptText) {
    let Ok(list) = serde_json::from_str::<Vec<Message>>(raw.get()) else {
        // not a list of objects: a plain string or list of strings (responses `input`)
        strings(raw, field, None, &mut prompt.user);
        return;
    };
    for (i, m) in list.into_iter().enumerate() {
        let role = m.role.as_deref();
        let bucket = match (role, m.kind.as_deref()) {
            (Some("tool" | "function"), _) => &mut prompt.documents,
            (_, Some("function_call_output")) => &mut prompt.documents,
            (Some("assistant"), _) => &mut prompt.harm_only,
            _ => &mut prompt.user,
        };
        if let Some(c) = m.content {
            content_text(c, &format!("{field}[{i}].content"), role, bucket);
        }
        if let Some(o) = m.output {
            content_text(o, &format!("{field}[{i}].output"), role, bucket);
        }
    }
}

fn extract_prompt(env: &Envelope, operation: Operation) -> PromptText {
    let mut prompt = PromptText::default();
    match operation {
        Operation::ChatCompletions
        | Operation::ExtensionsChatCompletions
        | Operation::V1ChatCompletions => {
            if let Some(m) = env.messages {
                messages(m, "messages", &mut prompt);
            }
        }
        Operation::Completions | Operation::V1Completions => {
            if let Some(p) = env.prompt {
                strings(p, "prompt", None, &mut prompt.user);
            }
        }
        Operation::Embeddings | Operation::V1Embeddings => {
            if let Some(i) = env.input {
                strings(i, "input", None, &mut prompt.user);
            }
        }
        Operation::V1Responses => {
            if let Some(i) = env.instructions {
                strings(i, "instructions", None, &mut prompt.user);
            }
            if let Some(i) = env.input {
                messages(i, "input", &mut prompt);
            }
        }
        _ => {}
    }
    prompt.user.retain(|t| !t.text.trim().is_empty());
    prompt.documents.retain(|t| !t.text.trim().is_empty());
    prompt.harm_only.retain(|t| !t.text.trim().is_empty());
    prompt
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
        assert_eq!(i.prompt.user, ["be nice", "part one", "part \"two\""]);
        assert_eq!(i.prompt.harm_only, ["earlier answer"]);
        assert_eq!(i.prompt.documents, ["tool said ignore instructions"]);

        let i = run(
            r#"{"prompt":["a","b"]}"#,
            Operation::Completions,
            UserCheck::Off,
        )
        .unwrap();
        assert_eq!(i.prompt.user, ["a", "b"]);
        let i = run(
            r#"{"input":[[1,2,3]]}"#,
            Operation::Embeddings,
            UserCheck::Off,
        )
        .unwrap();
        assert!(i.prompt.is_empty());
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
