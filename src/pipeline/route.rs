//! Stage 1, **route**: runs first, for every request.
//!
//! Turns the raw request path and query into a [`Route`]: the health check, or an
//! [`UpstreamTarget`] naming the deployment, the operation and the exact AOAI path and query to
//! call. It reads the *raw* (still percent-encoded) path, so an encoded slash or dot can never
//! smuggle a different upstream path past the checks.
//!
//! Short-circuits with 400 (malformed path or query), 404 (well-formed but not served) and 405
//! (served, but not for this method). Adds to the request context: deployment, operation,
//! upstream path and query.
//!
//! Accepted forms, all under `/api/FwdProxy/openai/`:
//! - `deployments/health/check` (GET/HEAD): the AppGW probe, no key, no upstream call;
//! - `deployments/{deployment}/chatcompletions` and `…/extensionschatcompletions`: the short
//!   names the AppGW rewrite rules produce;
//! - `deployments/{deployment}/{operation}` in native AOAI form (`chat/completions`, …);
//! - `v1/{…}`: the v1 surface, where the deployment travels in the body as `model`;
//! - `responses…`, `files…`, `batches…` with `api-version` (the `AzureOpenAI` client's form of
//!   the deployment-less operations; the same operations as their `v1/…` forms).

use http::Method;

use crate::error::AppError;

/// Prefix the Functions host keeps on forwarded paths (route prefix `api`, function `FwdProxy`).
pub const PREFIX: &str = "/api/FwdProxy/openai/";
/// The health path the AppGW probe calls.
pub const HEALTH_PATH: &str = "/api/FwdProxy/openai/deployments/health/check";
/// AOAI caps deployment names at 64 characters.
const MAX_DEPLOYMENT_LEN: usize = 64;
/// Longest id segment we pass on (response and model ids are far shorter).
const MAX_SEGMENT_LEN: usize = 256;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Upstream(UpstreamTarget),
}

/// The AOAI call a request maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// Deployment from the path (`None` on the v1 surface, where it is the body's `model`).
    pub deployment: Option<String>,
    pub operation: Operation,
    /// Upstream path, e.g. `/openai/deployments/gpt-4o/chat/completions`.
    pub path: String,
    /// Upstream query rebuilt from parsed pairs, without `?`; may be empty.
    pub query: String,
}

/// The data-plane operations we forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    ExtensionsChatCompletions,
    Completions,
    Embeddings,
    ImageGenerations,
    AudioTranscriptions,
    AudioTranslations,
    AudioSpeech,
    V1ChatCompletions,
    V1Completions,
    V1Embeddings,
    V1Responses,
    /// `v1/responses/{id}` and its sub-resources (`input_items`, `cancel`).
    V1ResponseItem,
    V1Models,
    /// `responses?api-version=…`: the `AzureOpenAI` client's form of `v1/responses`.
    Responses,
    /// `responses/{id}…?api-version=…`.
    ResponseItem,
    V1ImageGenerations,
    V1AudioTranscriptions,
    V1AudioTranslations,
    V1AudioSpeech,
    /// `POST files` (both forms): a multipart upload; a `purpose=batch` file is screened line by
    /// line (`pipeline::batch`).
    FileUpload,
    /// `GET files`, `GET`/`DELETE files/{id}`, `GET files/{id}/content`.
    Files,
    /// `POST batches`: names an uploaded (screened) file; no prompt in its body.
    BatchCreate,
    /// `GET batches`, `GET batches/{id}`, `POST batches/{id}/cancel`.
    Batches,
}

impl Operation {
    /// Every operation, for tests that must cover each one (the gate's map of what the model
    /// reads is checked against this list).
    pub const ALL: &'static [Operation] = &[
        Operation::ChatCompletions,
        Operation::ExtensionsChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::ImageGenerations,
        Operation::AudioTranscriptions,
        Operation::AudioTranslations,
        Operation::AudioSpeech,
        Operation::V1ChatCompletions,
        Operation::V1Completions,
        Operation::V1Embeddings,
        Operation::V1Responses,
        Operation::V1ResponseItem,
        Operation::V1Models,
        Operation::Responses,
        Operation::ResponseItem,
        Operation::V1ImageGenerations,
        Operation::V1AudioTranscriptions,
        Operation::V1AudioTranslations,
        Operation::V1AudioSpeech,
        Operation::FileUpload,
        Operation::Files,
        Operation::BatchCreate,
        Operation::Batches,
    ];

    /// Stable name for logs and records.
    pub fn name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::ExtensionsChatCompletions => "extensions/chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::ImageGenerations => "images/generations",
            Operation::AudioTranscriptions => "audio/transcriptions",
            Operation::AudioTranslations => "audio/translations",
            Operation::AudioSpeech => "audio/speech",
            Operation::V1ChatCompletions => "v1/chat/completions",
            Operation::V1Completions => "v1/completions",
            Operation::V1Embeddings => "v1/embeddings",
            Operation::V1Responses => "v1/responses",
            Operation::V1ResponseItem => "v1/responses/item",
            Operation::V1Models => "v1/models",
            Operation::Responses => "responses",
            Operation::ResponseItem => "responses/item",
            Operation::V1ImageGenerations => "v1/images/generations",
            Operation::V1AudioTranscriptions => "v1/audio/transcriptions",
            Operation::V1AudioTranslations => "v1/audio/translations",
            Operation::V1AudioSpeech => "v1/audio/speech",
            Operation::FileUpload => "files/upload",
            Operation::Files => "files",
            Operation::BatchCreate => "batches/create",
            Operation::Batches => "batches",
        }
    }

    /// Operations whose prompt Prompt Shields should see (embeddings are never executed as
    /// instructions, so they get harm screening only).
    /// A batch upload is screened line by line, each line by its own operation's rule.
    pub fn shieldable(self) -> bool {
        self.carries_prompt()
            && !matches!(
                self,
                Operation::Embeddings | Operation::V1Embeddings | Operation::FileUpload
            )
    }

    /// Operations whose body carries text the model reads (and a `user` field): they go
    /// through the gate. JSON bodies, and the multipart forms of transcriptions and translations
    /// (whose `prompt` is text). What is read of each is the gate's map
    /// (`policy::map::spec`), which a test keeps in step with this list.
    /// A batch input upload (`FileUpload`) carries the prompts of many requests.
    pub fn carries_prompt(self) -> bool {
        !matches!(
            self,
            Operation::V1ResponseItem
                | Operation::V1Models
                | Operation::ResponseItem
                | Operation::Files
                | Operation::BatchCreate
                | Operation::Batches
        )
    }
}

/// Deployment operations: (path segments after the deployment, upstream operation path, op).
const DEPLOYMENT_OPS: &[(&[&str], &str, Operation)] = &[
    (
        &["chatcompletions"],
        "chat/completions",
        Operation::ChatCompletions,
    ),
    (
        &["extensionschatcompletions"],
        "extensions/chat/completions",
        Operation::ExtensionsChatCompletions,
    ),
    (
        &["chat", "completions"],
        "chat/completions",
        Operation::ChatCompletions,
    ),
    (
        &["extensions", "chat", "completions"],
        "extensions/chat/completions",
        Operation::ExtensionsChatCompletions,
    ),
    (&["completions"], "completions", Operation::Completions),
    (&["embeddings"], "embeddings", Operation::Embeddings),
    (
        &["images", "generations"],
        "images/generations",
        Operation::ImageGenerations,
    ),
    (
        &["audio", "transcriptions"],
        "audio/transcriptions",
        Operation::AudioTranscriptions,
    ),
    (
        &["audio", "translations"],
        "audio/translations",
        Operation::AudioTranslations,
    ),
    (&["audio", "speech"], "audio/speech", Operation::AudioSpeech),
];

/// Resolve a request to a [`Route`]. `path` is the raw request path, `query` the raw query.
pub fn resolve(method: &Method, path: &str, query: Option<&str>) -> Result<Route, AppError> {
    let rest = strip_prefix_ci(path, PREFIX).ok_or(AppError::NotFound)?;
    let segments = check_segments(rest)?;

    match segments.as_slice() {
        ["deployments", "health", "check"] => {
            if method == Method::GET || method == Method::HEAD {
                Ok(Route::Health)
            } else {
                Err(AppError::MethodNotAllowed)
            }
        }
        ["deployments", deployment, op @ ..] if !op.is_empty() => {
            check_deployment(deployment)?;
            let (_, upstream_op, operation) = DEPLOYMENT_OPS
                .iter()
                .find(|(segs, _, _)| *segs == op)
                .ok_or(AppError::NotFound)?;
            require_method(method, &[Method::POST])?;
            let query = rebuild_query(query, true)?;
            Ok(Route::Upstream(UpstreamTarget {
                deployment: Some((*deployment).to_string()),
                operation: *operation,
                // concatenated, not `format!`: half the instructions of the formatting machinery
                path: ["/openai/deployments/", deployment, "/", upstream_op].concat(),
                query,
            }))
        }
        ["v1", op @ ..] => {
            let (operation, methods) = match op {
                ["chat", "completions"] => (Operation::V1ChatCompletions, POST),
                ["completions"] => (Operation::V1Completions, POST),
                ["embeddings"] => (Operation::V1Embeddings, POST),
                ["responses"] => (Operation::V1Responses, POST),
                ["responses", _id] => (Operation::V1ResponseItem, GET_DELETE),
                ["responses", _id, "input_items"] => (Operation::V1ResponseItem, GET),
                ["responses", _id, "cancel"] => (Operation::V1ResponseItem, POST),
                ["models"] | ["models", _] => (Operation::V1Models, GET),
                ["images", "generations"] => (Operation::V1ImageGenerations, POST),
                ["audio", "transcriptions"] => (Operation::V1AudioTranscriptions, POST),
                ["audio", "translations"] => (Operation::V1AudioTranslations, POST),
                ["audio", "speech"] => (Operation::V1AudioSpeech, POST),
                _ => files_or_batches(method, op).ok_or(AppError::NotFound)?,
            };
            require_method(method, methods)?;
            let query = rebuild_query(query, false)?;
            Ok(Route::Upstream(UpstreamTarget {
                deployment: None,
                operation,
                path: format!("/openai/v1/{}", op.join("/")),
                query,
            }))
        }
        // The `AzureOpenAI` client's form of the deployment-less operations: same operations,
        // `api-version` required, no `v1/` in the path.
        op @ (["responses", ..] | ["files", ..] | ["batches", ..]) => {
            let (operation, methods) = match op {
                ["responses"] => (Operation::Responses, POST),
                ["responses", _id] => (Operation::ResponseItem, GET_DELETE),
                ["responses", _id, "input_items"] => (Operation::ResponseItem, GET),
                ["responses", _id, "cancel"] => (Operation::ResponseItem, POST),
                _ => files_or_batches(method, op).ok_or(AppError::NotFound)?,
            };
            require_method(method, methods)?;
            let query = rebuild_query(query, true)?;
            Ok(Route::Upstream(UpstreamTarget {
                deployment: None,
                operation,
                path: format!("/openai/{}", op.join("/")),
                query,
            }))
        }
        _ => Err(AppError::NotFound),
    }
}

const POST: &[Method] = &[Method::POST];
const GET: &[Method] = &[Method::GET];
const GET_DELETE: &[Method] = &[Method::GET, Method::DELETE];

/// Files and batches, the same under both forms. `files` takes `POST` (upload) and `GET` (list),
/// which are different operations: the upload is the one whose body is read.
fn files_or_batches(method: &Method, op: &[&str]) -> Option<(Operation, &'static [Method])> {
    Some(match op {
        ["files"] if method == Method::POST => (Operation::FileUpload, POST),
        ["files"] => (Operation::Files, GET),
        ["files", _id] => (Operation::Files, GET_DELETE),
        ["files", _id, "content"] => (Operation::Files, GET),
        ["batches"] if method == Method::POST => (Operation::BatchCreate, POST),
        ["batches"] => (Operation::Batches, GET),
        ["batches", _id] => (Operation::Batches, GET),
        ["batches", _id, "cancel"] => (Operation::Batches, POST),
        _ => return None,
    })
}

/// The prefix is matched case-insensitively: the Functions host matches routes that way.
fn strip_prefix_ci<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let head = path.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &path[prefix.len()..])
}

fn require_method(method: &Method, allowed: &[Method]) -> Result<(), AppError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(AppError::MethodNotAllowed)
    }
}

/// Every segment must be non-empty, not `.`/`..`, and made only of URL-unreserved characters.
/// That rules out percent-encoding (encoded slashes, dots, control characters) wholesale: no
/// AOAI deployment, operation, model or response id needs it.
fn check_segments(rest: &str) -> Result<Vec<&str>, AppError> {
    let mut segments = Vec::with_capacity(4);
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(AppError::BadPath("The path has an empty segment".into()));
        }
        if seg == "." || seg == ".." {
            return Err(AppError::BadPath(
                "The path must not contain '.' or '..' segments".into(),
            ));
        }
        if seg.len() > MAX_SEGMENT_LEN {
            return Err(AppError::BadPath("A path segment is too long".into()));
        }
        if let Some(c) = seg.chars().find(|c| !is_unreserved(*c)) {
            let what = match c {
                '%' => "percent-encoded characters (such as encoded slashes)".to_string(),
                c if c.is_control() => "control characters".to_string(),
                c => format!("the character {c:?}"),
            };
            return Err(AppError::BadPath(format!(
                "The path must not contain {what}"
            )));
        }
        segments.push(seg);
    }
    Ok(segments)
}

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')
}

/// AOAI deployment names: 1–64 of letters, digits, `-`, `_`, `.`.
fn check_deployment(name: &str) -> Result<(), AppError> {
    let ok = name.len() <= MAX_DEPLOYMENT_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadPath(format!(
            "The deployment name must be 1-{MAX_DEPLOYMENT_LEN} letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Parse the query into pairs and serialise them again, so what reaches AOAI is exactly the
/// pairs we parsed (an encoded `&` or `=` stays inside its value). Drops `code` (a Functions
/// key must never reach AOAI). `api-version` must appear once and be sane where AOAI requires it.
fn rebuild_query(raw: Option<&str>, api_version_required: bool) -> Result<String, AppError> {
    if let Some(plain) = plain_query(raw.unwrap_or(""), api_version_required) {
        return Ok(plain);
    }
    rebuild_parsed(raw, api_version_required)
}

/// Query keys that never reach AOAI: the Functions key (`code`) and credentials a client may put
/// in the query (`api-key`, as AOAI itself would accept it, and API Management's
/// `subscription-key`): the internal key belongs to us, and AOAI gets the real one in a header.
fn dropped_query_key(key: &str) -> bool {
    ["code", "api-key", "subscription-key"]
        .iter()
        .any(|k| key.eq_ignore_ascii_case(k))
}

/// [`rebuild_query`] the long way: every pair decoded, checked and encoded again.
fn rebuild_parsed(raw: Option<&str>, api_version_required: bool) -> Result<String, AppError> {
    let mut out = form_urlencoded::Serializer::new(String::new());
    let mut api_versions = 0;
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if key.chars().any(char::is_control) || value.chars().any(char::is_control) {
            return Err(AppError::BadQuery(
                "The query string must not contain control characters".into(),
            ));
        }
        if dropped_query_key(&key) {
            continue;
        }
        // AOAI's front end reads query keys regardless of case: `API-VERSION` is another
        // `api-version`, so two spellings are two values (a red-team finding).
        if key.eq_ignore_ascii_case("api-version") {
            api_versions += 1;
            let ok = !value.is_empty()
                && value.len() <= 32
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                return Err(AppError::BadQuery(
                    "The api-version query parameter is malformed".into(),
                ));
            }
        }
        out.append_pair(&key, &value);
    }
    if api_versions > 1 {
        return Err(AppError::BadQuery(
            "The api-version query parameter must appear once".into(),
        ));
    }
    if api_version_required && api_versions == 0 {
        return Err(AppError::BadQuery(
            "Missing required query parameter: api-version".into(),
        ));
    }
    Ok(out.finish())
}

/// The common query (`api-version=2024-10-21`, maybe a `code`) without a parse and a re-encode:
/// when every pair is `key=value` made only of characters `form_urlencoded` neither decodes nor
/// encodes (letters, digits, `*-._`), the rebuilt query is the raw one without its `code`
/// pairs. `None` sends anything else, and every refusal, down the full path.
fn plain_query(raw: &str, api_version_required: bool) -> Option<String> {
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_'))
    };
    let mut out = String::with_capacity(raw.len());
    let mut api_versions = 0;
    if !raw.is_empty() {
        for pair in raw.split('&') {
            let (key, value) = pair.split_once('=')?;
            if key.is_empty() || !plain(key) || !plain(value) {
                return None;
            }
            if dropped_query_key(key) {
                continue;
            }
            if key.eq_ignore_ascii_case("api-version") {
                api_versions += 1;
                if value.is_empty() || value.len() > 32 || value.contains(['*', '_']) {
                    return None;
                }
            }
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(pair);
        }
    }
    (api_versions == 1 || (api_versions == 0 && !api_version_required)).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(method: Method, path: &str, query: Option<&str>) -> UpstreamTarget {
        match resolve(&method, path, query) {
            Ok(Route::Upstream(t)) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn status(method: Method, path: &str, query: Option<&str>) -> u16 {
        resolve(&method, path, query).unwrap_err().status().as_u16()
    }

    const Q: Option<&str> = Some("api-version=2024-10-21");

    #[test]
    fn credentials_in_the_query_never_reach_aoai() {
        for raw in [
            "api-version=2024-10-21&api-key=internal-key-0001&a=b",
            "API-KEY=internal-key-0001&api-version=2024-10-21&a=b&code=f",
            "api-version=2024-10-21&Subscription-Key=s%20k&a=b",
            "api-version=2024-10-21&a=b&api%2Dkey=internal-key-0001",
        ] {
            assert_eq!(
                rebuild_query(Some(raw), true).unwrap(),
                "api-version=2024-10-21&a=b",
                "{raw}"
            );
        }
    }

    #[test]
    fn short_names_map_to_native_paths() {
        let t = up(
            Method::POST,
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions",
            Q,
        );
        assert_eq!(t.path, "/openai/deployments/gpt-4o/chat/completions");
        assert_eq!(t.query, "api-version=2024-10-21");
        assert_eq!(t.deployment.as_deref(), Some("gpt-4o"));
        let t = up(
            Method::POST,
            "/api/FwdProxy/openai/deployments/gpt-4o/extensionschatcompletions",
            Q,
        );
        assert_eq!(
            t.path,
            "/openai/deployments/gpt-4o/extensions/chat/completions"
        );
    }

    #[test]
    fn native_operations_keep_their_path() {
        for op in [
            "chat/completions",
            "completions",
            "embeddings",
            "images/generations",
            "audio/transcriptions",
            "audio/translations",
            "audio/speech",
            "extensions/chat/completions",
        ] {
            let t = up(
                Method::POST,
                &format!("/api/FwdProxy/openai/deployments/my.model_v2-1/{op}"),
                Q,
            );
            assert_eq!(t.path, format!("/openai/deployments/my.model_v2-1/{op}"));
        }
    }

    #[test]
    fn v1_surface() {
        let t = up(
            Method::POST,
            "/api/FwdProxy/openai/v1/chat/completions",
            None,
        );
        assert_eq!(t.path, "/openai/v1/chat/completions");
        assert_eq!(t.deployment, None);
        assert_eq!(t.query, "");
        assert_eq!(
            up(Method::GET, "/api/FwdProxy/openai/v1/models/gpt-4o", None).path,
            "/openai/v1/models/gpt-4o"
        );
        assert_eq!(
            up(
                Method::POST,
                "/api/FwdProxy/openai/v1/responses",
                Some("api-version=preview")
            )
            .query,
            "api-version=preview"
        );
        assert_eq!(
            status(Method::POST, "/api/FwdProxy/openai/v1/models", None),
            405
        );
        assert_eq!(
            status(
                Method::POST,
                "/api/FwdProxy/openai/v1/fine_tuning/jobs",
                None
            ),
            404
        );
    }

    #[test]
    fn every_operation_the_router_resolves_is_listed_in_all() {
        let mut resolved: Vec<Operation> = DEPLOYMENT_OPS.iter().map(|(_, _, op)| *op).collect();
        for (method, path) in [
            (Method::POST, "chat/completions"),
            (Method::POST, "completions"),
            (Method::POST, "embeddings"),
            (Method::POST, "responses"),
            (Method::GET, "responses/r1"),
            (Method::GET, "models"),
            (Method::POST, "images/generations"),
            (Method::POST, "audio/speech"),
            (Method::POST, "audio/transcriptions"),
            (Method::POST, "audio/translations"),
        ] {
            resolved.push(up(method, &format!("/api/FwdProxy/openai/v1/{path}"), None).operation);
        }
        for (method, path, _, _) in NEW_ROUTES {
            resolved.push(up(method.clone(), &format!("{PREFIX}{path}"), Q).operation);
            resolved.push(up(method.clone(), &format!("{PREFIX}v1/{path}"), None).operation);
        }
        for op in resolved {
            assert!(
                Operation::ALL.contains(&op),
                "{op:?} missing from Operation::ALL"
            );
        }
        // and nothing twice
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert!(!Operation::ALL[i + 1..].contains(op));
        }
    }

    /// Responses, files and batches: (method, path after the prefix, operation under the
    /// `api-version` form, operation under the `v1/` form).
    const NEW_ROUTES: &[(Method, &str, Operation, Operation)] = &[
        (
            Method::POST,
            "responses",
            Operation::Responses,
            Operation::V1Responses,
        ),
        (
            Method::GET,
            "responses/resp_1",
            Operation::ResponseItem,
            Operation::V1ResponseItem,
        ),
        (
            Method::DELETE,
            "responses/resp_1",
            Operation::ResponseItem,
            Operation::V1ResponseItem,
        ),
        (
            Method::GET,
            "responses/resp_1/input_items",
            Operation::ResponseItem,
            Operation::V1ResponseItem,
        ),
        (
            Method::POST,
            "responses/resp_1/cancel",
            Operation::ResponseItem,
            Operation::V1ResponseItem,
        ),
        (
            Method::POST,
            "files",
            Operation::FileUpload,
            Operation::FileUpload,
        ),
        (Method::GET, "files", Operation::Files, Operation::Files),
        (
            Method::GET,
            "files/file-abc",
            Operation::Files,
            Operation::Files,
        ),
        (
            Method::DELETE,
            "files/file-abc",
            Operation::Files,
            Operation::Files,
        ),
        (
            Method::GET,
            "files/file-abc/content",
            Operation::Files,
            Operation::Files,
        ),
        (
            Method::POST,
            "batches",
            Operation::BatchCreate,
            Operation::BatchCreate,
        ),
        (
            Method::GET,
            "batches",
            Operation::Batches,
            Operation::Batches,
        ),
        (
            Method::GET,
            "batches/batch_1",
            Operation::Batches,
            Operation::Batches,
        ),
        (
            Method::POST,
            "batches/batch_1/cancel",
            Operation::Batches,
            Operation::Batches,
        ),
    ];

    #[test]
    fn responses_files_and_batches_on_both_forms() {
        for (method, path, op, v1_op) in NEW_ROUTES {
            let t = up(method.clone(), &format!("{PREFIX}{path}"), Q);
            assert_eq!(
                (t.operation, t.path.as_str()),
                (*op, &*format!("/openai/{path}"))
            );
            assert_eq!(t.query, "api-version=2024-10-21");
            assert_eq!(t.deployment, None);
            // the api-version form needs api-version, as AOAI does
            assert_eq!(
                status(method.clone(), &format!("{PREFIX}{path}"), None),
                400,
                "{path}"
            );
            let t = up(method.clone(), &format!("{PREFIX}v1/{path}"), None);
            assert_eq!(
                (t.operation, t.path.as_str()),
                (*v1_op, &*format!("/openai/v1/{path}"))
            );
        }
        for (method, path) in [
            (Method::PUT, "files"),
            (Method::POST, "files/file-abc"),
            (Method::POST, "files/file-abc/content"),
            (Method::DELETE, "batches/batch_1"),
            (Method::GET, "batches/batch_1/cancel"),
            (Method::PUT, "responses"),
            (Method::GET, "responses"),
        ] {
            assert_eq!(
                status(method.clone(), &format!("{PREFIX}{path}"), Q),
                405,
                "{path}"
            );
            assert_eq!(
                status(method.clone(), &format!("{PREFIX}v1/{path}"), None),
                405,
                "{path}"
            );
        }
        for path in [
            "files/a/b",
            "batches/a/b",
            "responses/a/b",
            "fine_tuning/jobs",
            "files/a/content/x",
        ] {
            assert_eq!(
                status(Method::GET, &format!("{PREFIX}{path}"), Q),
                404,
                "{path}"
            );
        }
    }

    #[test]
    fn v1_images_and_audio() {
        for (path, op) in [
            ("images/generations", Operation::V1ImageGenerations),
            ("audio/speech", Operation::V1AudioSpeech),
            ("audio/transcriptions", Operation::V1AudioTranscriptions),
            ("audio/translations", Operation::V1AudioTranslations),
        ] {
            let t = up(Method::POST, &format!("{PREFIX}v1/{path}"), None);
            assert_eq!((t.operation, t.path), (op, format!("/openai/v1/{path}")));
            assert_eq!(
                status(Method::GET, &format!("{PREFIX}v1/{path}"), None),
                405
            );
        }
    }

    #[test]
    fn health() {
        assert_eq!(
            resolve(&Method::GET, HEALTH_PATH, None).unwrap(),
            Route::Health
        );
        assert_eq!(
            resolve(&Method::HEAD, HEALTH_PATH, None).unwrap(),
            Route::Health
        );
        assert_eq!(status(Method::POST, HEALTH_PATH, None), 405);
    }

    #[test]
    fn bad_paths_are_400() {
        for p in [
            "/api/FwdProxy/openai/deployments/../chatcompletions",
            "/api/FwdProxy/openai/deployments/a%2Fb/chatcompletions",
            "/api/FwdProxy/openai/deployments/a%2fb/chatcompletions",
            "/api/FwdProxy/openai/deployments//chatcompletions",
            "/api/FwdProxy/openai/deployments/x/chatcompletions/",
            "/api/FwdProxy/openai/deployments/x%00/chatcompletions",
            "/api/FwdProxy/openai/deployments/x\u{1}/chatcompletions",
            "/api/FwdProxy/openai/deployments/x/./chatcompletions",
            "/api/FwdProxy/openai/deployments/a~b/chatcompletions",
        ] {
            assert_eq!(status(Method::POST, p, Q), 400, "{p}");
        }
        let long = format!(
            "/api/FwdProxy/openai/deployments/{}/chatcompletions",
            "a".repeat(65)
        );
        assert_eq!(status(Method::POST, &long, Q), 400);
    }

    #[test]
    fn unknown_is_404() {
        for p in [
            "/",
            "/api/other",
            "/api/FwdProxy/openai/deployments/x/fine_tunes",
            "/api/FwdProxy/openai/deployments/x",
            "/api/FwdProxy/openai/models",
        ] {
            assert_eq!(status(Method::POST, p, Q), 404, "{p}");
        }
    }

    #[test]
    fn api_version_is_one_key_in_any_case() {
        for q in [
            "API-VERSION=1&api-version=2",
            "Api-Version=2024-10-21&api-version=2024-10-21",
        ] {
            let e = resolve(
                &Method::POST,
                "/api/FwdProxy/openai/deployments/d/chatcompletions",
                Some(q),
            );
            assert!(matches!(e, Err(AppError::BadQuery(_))), "{q}");
        }
    }

    #[test]
    fn query_is_rebuilt_not_copied() {
        let t = up(
            Method::POST,
            "/api/FwdProxy/openai/deployments/x/chatcompletions",
            Some("api-version=2024-10-21&code=fnkey&x=a%26api-version%3D1"),
        );
        assert_eq!(t.query, "api-version=2024-10-21&x=a%26api-version%3D1");
        let path = "/api/FwdProxy/openai/deployments/x/chatcompletions";
        assert_eq!(status(Method::POST, path, None), 400);
        assert_eq!(status(Method::POST, path, Some("api-version=")), 400);
        assert_eq!(
            status(Method::POST, path, Some("api-version=a&api-version=b")),
            400
        );
        assert_eq!(
            status(Method::POST, path, Some("api-version=1%0d%0aX:1")),
            400
        );
        assert_eq!(status(Method::GET, path, Q), 405);
    }

    /// Properties of the resolver and the query rebuild over generated paths and queries.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Path segments: the words routes are made of, and the kinds of input that must never
        /// reach AOAI (encodings, dot segments, empties, controls, non-ASCII).
        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec![
                    "deployments", "v1", "chat", "completions", "chatcompletions",
                    "extensionschatcompletions", "extensions", "embeddings", "images",
                    "generations", "audio", "speech", "transcriptions", "responses",
                    "input_items", "cancel", "models", "health", "check", "gpt-4o", "resp_1",
                ])
                .prop_map(str::to_string),
                2 => prop::sample::select(vec![
                    "..", ".", "", "%2F", "%2f", "%2e%2e", "%2E", "%00", "%0A", "a%2Fb", "~",
                    "code", "?", "#", ";", "\\", "é", "\u{1}", " ", "\t", "a..b", "...",
                ])
                .prop_map(str::to_string),
                2 => "[a-zA-Z0-9._~%-]{1,12}",
                1 => any::<String>(),
            ]
        }

        /// What follows the prefix: free segments, or a route's shape with generated holes, so
        /// that a good share of the cases resolve to an upstream target.
        fn tail() -> impl Strategy<Value = String> {
            let templates = prop::sample::select(vec![
                "deployments/{}/chatcompletions",
                "deployments/{}/chat/completions",
                "deployments/{}/{}",
                "deployments/{}/{}/{}",
                "v1/responses/{}",
                "v1/responses/{}/{}",
                "v1/models/{}",
                "v1/{}",
                "v1/{}/{}",
            ]);
            prop_oneof![
                prop::collection::vec(segment(), 0..6).prop_map(|s| s.join("/")),
                (templates, prop::collection::vec(segment(), 3)).prop_map(|(t, holes)| {
                    let mut out = t.to_string();
                    for h in holes {
                        out = out.replacen("{}", &h, 1);
                    }
                    out
                }),
            ]
        }

        fn method() -> impl Strategy<Value = Method> {
            prop::sample::select(vec![
                Method::GET,
                Method::POST,
                Method::DELETE,
                Method::HEAD,
                Method::PUT,
                Method::PATCH,
            ])
        }

        fn query() -> impl Strategy<Value = Option<String>> {
            let pair = (
                prop_oneof![
                    Just("api-version".to_string()),
                    Just("code".to_string()),
                    Just("CODE".to_string()),
                    Just("Code".to_string()),
                    Just("api-key".to_string()),
                    Just("Subscription-Key".to_string()),
                    "[a-z%&=+-]{0,8}",
                    any::<String>(),
                ],
                prop_oneof![
                    Just("2024-10-21".to_string()),
                    "[a-zA-Z0-9%&=+. -]{0,12}",
                    any::<String>()
                ],
            );
            prop::option::of(prop::collection::vec(pair, 0..5).prop_map(|pairs| {
                pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            }))
        }

        /// Queries near the fast path's edges: plain pairs, `code` and `api-version` in any
        /// case, and every character that decodes or encodes differently.
        fn plain_edges() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                "[a-zA-Z0-9*._-]{0,6}",
                Just("api-version".to_string()),
                Just("API-Version".to_string()),
                Just("code".to_string()),
                Just("CoDe".to_string()),
                Just("API-KEY".to_string()),
                Just("2024-10-21".to_string()),
                "[%+~=&;/ a-z0-9_*]{1,4}",
            ];
            prop::collection::vec((piece.clone(), prop::option::of(piece)), 0..5).prop_map(
                |pairs| {
                    pairs
                        .into_iter()
                        .map(|(k, v)| match v {
                            Some(v) => format!("{k}={v}"),
                            None => k,
                        })
                        .collect::<Vec<_>>()
                        .join("&")
                },
            )
        }

        #[test]
        fn the_fast_path_takes_the_common_queries() {
            for (raw, want) in [
                ("api-version=2024-10-21", "api-version=2024-10-21"),
                ("code=k&api-version=2024-10-21", "api-version=2024-10-21"),
                ("api-version=2024-10-21&CODE=k", "api-version=2024-10-21"),
                ("api-version=preview&x=1", "api-version=preview&x=1"),
            ] {
                assert_eq!(plain_query(raw, true).as_deref(), Some(want), "{raw}");
            }
            assert_eq!(plain_query("", false).as_deref(), Some(""));
            for long_way in [
                "",
                "api-version=a%2Db",
                "api-version=1&api-version=2",
                "a&api-version=1",
                "api-version=x_y",
            ] {
                assert_eq!(plain_query(long_way, true), None, "{long_way}");
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

            /// Whatever the fast path answers is exactly what the full parse answers.
            #[test]
            fn the_fast_path_agrees_with_the_full_parse(raw in plain_edges(), required in any::<bool>()) {
                if let Some(fast) = plain_query(&raw, required) {
                    let slow = rebuild_parsed(Some(&raw), required);
                    prop_assert_eq!(Some(fast), slow.ok(), "{}", raw);
                }
            }

            /// Whatever comes in, what goes to AOAI is a clean path under `/openai/`: no
            /// percent-encoding, no dot or empty segments; the query has no `code` and at most
            /// one `api-version` (exactly one on deployment routes).
            #[test]
            fn upstream_path_is_always_clean(
                method in method(),
                tail in tail(),
                query in query(),
            ) {
                let path = format!("{PREFIX}{tail}");
                if let Ok(Route::Upstream(t)) = resolve(&method, &path, query.as_deref()) {
                    prop_assert!(t.path.starts_with("/openai/"), "{}", t.path);
                    prop_assert!(!t.path.contains('%'), "{}", t.path);
                    for seg in t.path.trim_start_matches('/').split('/') {
                        prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{}", t.path);
                        prop_assert!(seg.chars().all(is_unreserved), "{}", t.path);
                    }
                    let pairs: Vec<(String, String)> =
                        form_urlencoded::parse(t.query.as_bytes()).into_owned().collect();
                    prop_assert!(!pairs.iter().any(|(k, _)| dropped_query_key(k)), "{}", t.query);
                    let versions = pairs.iter().filter(|(k, _)| k == "api-version").count();
                    if t.deployment.is_some() {
                        prop_assert_eq!(versions, 1, "{}", t.query);
                    } else {
                        prop_assert!(versions <= 1, "{}", t.query);
                    }
                    prop_assert!(!t.query.chars().any(|c| c.is_control()), "{}", t.query);
                }
            }

            /// The same holds with any casing of the route prefix (the host matches it
            /// case-insensitively), and a resolved route never depends on that casing.
            #[test]
            fn prefix_case_does_not_change_the_route(
                segments in prop::collection::vec(segment(), 1..5),
                flips in prop::collection::vec(any::<bool>(), PREFIX.len()),
            ) {
                let prefix: String = PREFIX
                    .chars()
                    .zip(flips)
                    .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                    .collect();
                let rest = segments.join("/");
                let q = Some("api-version=2024-10-21");
                let a = resolve(&Method::POST, &format!("{PREFIX}{rest}"), q);
                let b = resolve(&Method::POST, &format!("{prefix}{rest}"), q);
                prop_assert_eq!(a.map_err(|e| e.code()), b.map_err(|e| e.code()));
            }

            /// Rebuilding parses and re-serialises: the pairs AOAI sees are exactly the client's
            /// pairs, in order, minus `code`; an encoded `&` or `=` stays inside its value.
            #[test]
            fn query_round_trips_without_code(
                pairs in prop::collection::vec(
                    ("[^\\x00-\\x1f\\x7f-\\x9f]{0,10}", "[^\\x00-\\x1f\\x7f-\\x9f]{0,10}"),
                    0..6,
                ),
                at in any::<prop::sample::Index>(),
                codes in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            ) {
                let kept: Vec<(String, String)> = pairs
                    .into_iter()
                    .filter(|(k, _)| !dropped_query_key(k) && k != "api-version")
                    .collect();
                let mut sent = kept.clone();
                sent.insert(at.index(sent.len() + 1), ("api-version".into(), "2024-10-21".into()));
                let expected = sent.clone();
                for c in codes {
                    sent.insert(c.index(sent.len() + 1), ("code".into(), "fn-key&x=1".into()));
                }
                let raw = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&sent)
                    .finish();
                let rebuilt = rebuild_query(Some(&raw), true).unwrap();
                let back: Vec<(String, String)> =
                    form_urlencoded::parse(rebuilt.as_bytes()).into_owned().collect();
                prop_assert_eq!(back, expected);
            }

            /// A second `api-version`, in any position or spelling of its value, is refused.
            #[test]
            fn api_version_twice_is_refused(
                before in "[a-z]{1,5}=[a-z0-9]{0,5}",
                a in "[0-9a-z.-]{1,12}",
                b in "[0-9a-z.-]{1,12}",
            ) {
                let raw = format!("{before}&api-version={a}&api-version={b}");
                prop_assert_eq!(
                    rebuild_query(Some(&raw), false).unwrap_err().code(),
                    "invalid_query"
                );
            }
        }
    }
}
