//! Proof that the Application Gateway rewrite rules and the handler agree.
//!
//! Every row is a URL a real client sends to the gateway. The test runs it through the rules
//! AppGW is deployed with (`infra/rewrite-rules.json`, via [`fwdproxy_devkit::appgw`]), checks
//! the URL the Function App receives, then hands that URL to the handler's own route resolver
//! (`aoai_fwdproxy::pipeline::route::resolve`) and checks the AOAI path and query it forwards to.
//! Paths that must not be served are checked to pass the gateway unrewritten *and* to be refused
//! by the handler, so they can never reach AOAI.
//!
//! Two properties of the rule set are proven as well, because they make the result independent
//! of the finer points of AppGW's multi-rule semantics: no request matches more than one rule,
//! and no rule matches a path the rules produced (rewriting is idempotent).

use aoai_fwdproxy::pipeline::route::{resolve, Operation, Route, HEALTH_PATH};
use fwdproxy_devkit::appgw::RewriteRules;
use http::Method;

const HOST: &str = "aoai-gw.contoso.com";
const V: &str = "api-version=2024-10-21";

/// One client call and everything we expect of it.
struct Case {
    method: Method,
    /// What the client sends to the gateway: path and optional `?query`.
    client: &'static str,
    /// The rule that must rewrite it.
    rule: &'static str,
    /// What the Function App receives.
    backend: &'static str,
    /// Where the handler forwards it: `Some((aoai path, aoai query, operation))`, or `None` for
    /// the health check.
    upstream: Option<(&'static str, &'static str, Operation)>,
}

fn split(uri: &str) -> (&str, Option<&str>) {
    match uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (uri, None),
    }
}

fn case(
    method: Method,
    client: &'static str,
    rule: &'static str,
    backend: &'static str,
    upstream: Option<(&'static str, &'static str, Operation)>,
) -> Case {
    Case {
        method,
        client,
        rule,
        backend,
        upstream,
    }
}

fn cases() -> Vec<Case> {
    use Operation as O;
    let post = || Method::POST;
    vec![
        // chat/completions → the short name, deployment kept with its case.
        case(
            post(),
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21",
            Some(("/openai/deployments/gpt-4o/chat/completions", V, O::ChatCompletions)),
        ),
        case(
            post(),
            "/openai/deployments/GPT4O/chat/completions?api-version=2024-10-21",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/GPT4O/chatcompletions?api-version=2024-10-21",
            Some(("/openai/deployments/GPT4O/chat/completions", V, O::ChatCompletions)),
        ),
        case(
            post(),
            "/openai/deployments/my.model_v2-1/chat/completions?api-version=2024-10-21",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/my.model_v2-1/chatcompletions?api-version=2024-10-21",
            Some((
                "/openai/deployments/my.model_v2-1/chat/completions",
                V,
                O::ChatCompletions,
            )),
        ),
        // Extra query parameters travel whole and in order; a function key (`code`) is dropped
        // by the handler before AOAI sees it.
        case(
            post(),
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&trace=abc&x=1%262",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=2024-10-21&trace=abc&x=1%262",
            Some((
                "/openai/deployments/gpt-4o/chat/completions",
                "api-version=2024-10-21&trace=abc&x=1%262",
                O::ChatCompletions,
            )),
        ),
        case(
            post(),
            "/openai/deployments/gpt-4o/chat/completions?trace=abc&api-version=2025-01-01-preview&code=fnkey",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?trace=abc&api-version=2025-01-01-preview&code=fnkey",
            Some((
                "/openai/deployments/gpt-4o/chat/completions",
                "trace=abc&api-version=2025-01-01-preview",
                O::ChatCompletions,
            )),
        ),
        // extensions/chat/completions → its own short name.
        case(
            post(),
            "/openai/deployments/gpt-4o/extensions/chat/completions?api-version=2024-10-21",
            "aoai-extensions-chat-completions",
            "/api/FwdProxy/openai/deployments/gpt-4o/extensionschatcompletions?api-version=2024-10-21",
            Some((
                "/openai/deployments/gpt-4o/extensions/chat/completions",
                V,
                O::ExtensionsChatCompletions,
            )),
        ),
        case(
            post(),
            "/openai/deployments/my.model_v2-1/extensions/chat/completions?api-version=2024-10-21",
            "aoai-extensions-chat-completions",
            "/api/FwdProxy/openai/deployments/my.model_v2-1/extensionschatcompletions?api-version=2024-10-21",
            Some((
                "/openai/deployments/my.model_v2-1/extensions/chat/completions",
                V,
                O::ExtensionsChatCompletions,
            )),
        ),
        // Every other deployment operation passes in native form.
        case(
            post(),
            "/openai/deployments/gpt-35-turbo-instruct/completions?api-version=2024-10-21",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/gpt-35-turbo-instruct/completions?api-version=2024-10-21",
            Some((
                "/openai/deployments/gpt-35-turbo-instruct/completions",
                V,
                O::Completions,
            )),
        ),
        case(
            post(),
            "/openai/deployments/text-embedding-3-large/embeddings?api-version=2024-10-21",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/text-embedding-3-large/embeddings?api-version=2024-10-21",
            Some((
                "/openai/deployments/text-embedding-3-large/embeddings",
                V,
                O::Embeddings,
            )),
        ),
        case(
            post(),
            "/openai/deployments/dall-e-3/images/generations?api-version=2024-10-21",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/dall-e-3/images/generations?api-version=2024-10-21",
            Some((
                "/openai/deployments/dall-e-3/images/generations",
                V,
                O::ImageGenerations,
            )),
        ),
        case(
            post(),
            "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
            Some((
                "/openai/deployments/whisper/audio/transcriptions",
                V,
                O::AudioTranscriptions,
            )),
        ),
        case(
            post(),
            "/openai/deployments/whisper/audio/translations?api-version=2024-10-21",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/whisper/audio/translations?api-version=2024-10-21",
            Some((
                "/openai/deployments/whisper/audio/translations",
                V,
                O::AudioTranslations,
            )),
        ),
        case(
            post(),
            "/openai/deployments/TTS_HD.1/audio/speech?api-version=2025-03-01-preview",
            "aoai-deployment-operations",
            "/api/FwdProxy/openai/deployments/TTS_HD.1/audio/speech?api-version=2025-03-01-preview",
            Some((
                "/openai/deployments/TTS_HD.1/audio/speech",
                "api-version=2025-03-01-preview",
                O::AudioSpeech,
            )),
        ),
        // A deployment literally named "health" still works for real operations.
        case(
            post(),
            "/openai/deployments/health/chat/completions?api-version=2024-10-21",
            "aoai-chat-completions",
            "/api/FwdProxy/openai/deployments/health/chatcompletions?api-version=2024-10-21",
            Some(("/openai/deployments/health/chat/completions", V, O::ChatCompletions)),
        ),
        // The health check.
        case(
            Method::GET,
            "/openai/deployments/health/check",
            "aoai-health-check",
            "/api/FwdProxy/openai/deployments/health/check",
            None,
        ),
        case(
            Method::GET,
            "/openai/deployments/health/check?probe=1",
            "aoai-health-check",
            "/api/FwdProxy/openai/deployments/health/check?probe=1",
            None,
        ),
        // The v1 surface: no api-version, the deployment travels in the body.
        case(
            post(),
            "/openai/v1/chat/completions",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/chat/completions",
            Some(("/openai/v1/chat/completions", "", O::V1ChatCompletions)),
        ),
        case(
            post(),
            "/openai/v1/chat/completions?api-version=preview",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/chat/completions?api-version=preview",
            Some((
                "/openai/v1/chat/completions",
                "api-version=preview",
                O::V1ChatCompletions,
            )),
        ),
        case(
            post(),
            "/openai/v1/completions",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/completions",
            Some(("/openai/v1/completions", "", O::V1Completions)),
        ),
        case(
            post(),
            "/openai/v1/embeddings",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/embeddings",
            Some(("/openai/v1/embeddings", "", O::V1Embeddings)),
        ),
        case(
            post(),
            "/openai/v1/responses",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/responses",
            Some(("/openai/v1/responses", "", O::V1Responses)),
        ),
        case(
            Method::GET,
            "/openai/v1/responses/resp_67ccd2bed1ec8190b14f964abc054267",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/responses/resp_67ccd2bed1ec8190b14f964abc054267",
            Some((
                "/openai/v1/responses/resp_67ccd2bed1ec8190b14f964abc054267",
                "",
                O::V1ResponseItem,
            )),
        ),
        case(
            Method::GET,
            "/openai/v1/responses/resp_1/input_items?limit=20",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/responses/resp_1/input_items?limit=20",
            Some((
                "/openai/v1/responses/resp_1/input_items",
                "limit=20",
                O::V1ResponseItem,
            )),
        ),
        case(
            post(),
            "/openai/v1/responses/resp_1/cancel",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/responses/resp_1/cancel",
            Some(("/openai/v1/responses/resp_1/cancel", "", O::V1ResponseItem)),
        ),
        case(
            Method::GET,
            "/openai/v1/models",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/models",
            Some(("/openai/v1/models", "", O::V1Models)),
        ),
        case(
            Method::GET,
            "/openai/v1/models/gpt-4o-2024-08-06",
            "aoai-v1",
            "/api/FwdProxy/openai/v1/models/gpt-4o-2024-08-06",
            Some(("/openai/v1/models/gpt-4o-2024-08-06", "", O::V1Models)),
        ),
        // v1 images and audio, through the v1 rule.
        case(post(), "/openai/v1/images/generations", "aoai-v1",
            "/api/FwdProxy/openai/v1/images/generations",
            Some(("/openai/v1/images/generations", "", O::V1ImageGenerations))),
        case(post(), "/openai/v1/audio/speech", "aoai-v1",
            "/api/FwdProxy/openai/v1/audio/speech",
            Some(("/openai/v1/audio/speech", "", O::V1AudioSpeech))),
        case(post(), "/openai/v1/audio/transcriptions", "aoai-v1",
            "/api/FwdProxy/openai/v1/audio/transcriptions",
            Some(("/openai/v1/audio/transcriptions", "", O::V1AudioTranscriptions))),
        case(post(), "/openai/v1/audio/translations", "aoai-v1",
            "/api/FwdProxy/openai/v1/audio/translations",
            Some(("/openai/v1/audio/translations", "", O::V1AudioTranslations))),
        case(post(), "/openai/v1/files", "aoai-v1", "/api/FwdProxy/openai/v1/files",
            Some(("/openai/v1/files", "", O::FileUpload))),
        case(post(), "/openai/v1/batches", "aoai-v1", "/api/FwdProxy/openai/v1/batches",
            Some(("/openai/v1/batches", "", O::BatchCreate))),
        // The AzureOpenAI client's form: responses, files, batches with api-version.
        case(post(), "/openai/responses?api-version=2024-10-21", "aoai-responses-files-batches",
            "/api/FwdProxy/openai/responses?api-version=2024-10-21",
            Some(("/openai/responses", V, O::Responses))),
        case(Method::GET, "/openai/responses/resp_1?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/responses/resp_1?api-version=2024-10-21",
            Some(("/openai/responses/resp_1", V, O::ResponseItem))),
        case(Method::GET, "/openai/responses/resp_1/input_items?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/responses/resp_1/input_items?api-version=2024-10-21",
            Some(("/openai/responses/resp_1/input_items", V, O::ResponseItem))),
        case(post(), "/openai/files?api-version=2024-10-21", "aoai-responses-files-batches",
            "/api/FwdProxy/openai/files?api-version=2024-10-21",
            Some(("/openai/files", V, O::FileUpload))),
        case(Method::GET, "/openai/files?api-version=2024-10-21", "aoai-responses-files-batches",
            "/api/FwdProxy/openai/files?api-version=2024-10-21",
            Some(("/openai/files", V, O::Files))),
        case(Method::GET, "/openai/files/file-abc123/content?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/files/file-abc123/content?api-version=2024-10-21",
            Some(("/openai/files/file-abc123/content", V, O::Files))),
        case(Method::DELETE, "/openai/files/file-abc123?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/files/file-abc123?api-version=2024-10-21",
            Some(("/openai/files/file-abc123", V, O::Files))),
        case(post(), "/openai/batches?api-version=2024-10-21", "aoai-responses-files-batches",
            "/api/FwdProxy/openai/batches?api-version=2024-10-21",
            Some(("/openai/batches", V, O::BatchCreate))),
        case(Method::GET, "/openai/batches/batch_1?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/batches/batch_1?api-version=2024-10-21",
            Some(("/openai/batches/batch_1", V, O::Batches))),
        case(post(), "/openai/batches/batch_1/cancel?api-version=2024-10-21",
            "aoai-responses-files-batches",
            "/api/FwdProxy/openai/batches/batch_1/cancel?api-version=2024-10-21",
            Some(("/openai/batches/batch_1/cancel", V, O::Batches))),
    ]
}

/// Paths the gateway must pass through unrewritten, and that the handler then refuses.
const MUST_NOT_MATCH: &[&str] = &[
    "/",
    "/admin",
    "/openai",
    "/openai/foo",
    "/openai/deployments",
    "/openai/deployments/x",
    "/openai/deployments/x/",
    "/openai/deployments//chat/completions",
    "/openai/deployments/x/chat/completions/",
    "/openai/deployments/x/chat/completions/../../etc",
    "/openai/deployments/x/../../admin",
    "/openai/deployments/../chat/completions",
    "/openai/deployments/./chat/completions",
    "/openai/deployments/x/./embeddings",
    "/openai/deployments/.hidden/chat/completions",
    "/openai/deployments/a%2Fb/chat/completions",
    "/openai/deployments/a%2e%2e/chat/completions",
    "/openai/deployments/x%00/embeddings",
    "/openai/deployments/a b/chat/completions",
    "/OPENAI/deployments/x/chat/completions",
    "/openai/Deployments/x/chat/completions",
    "/openai/v1",
    "/openai/v1/",
    "/openai/v1//models",
    "/openai/v1/models/../../admin",
    "/v1/chat/completions",
    "/api/openai/deployments/x/chat/completions",
    "/openai/deployments/health/check/",
    "/openai/responses/",
    "/openai/files//content",
    "/openai/files/../admin",
    "/openai/files/a%2Fb",
    "/openai/batchesx",
    "/openai/Files",
    "/openai/realtime",
];

/// Every operation the handler forwards ([`Operation::ALL`]); each must be reachable through the
/// gateway.
const ALL_OPERATIONS: &[Operation] = Operation::ALL;

fn rules() -> RewriteRules {
    RewriteRules::load_default().expect("infra/rewrite-rules.json compiles")
}

#[test]
fn client_urls_reach_the_right_aoai_path() {
    let rules = rules();
    let mut failures = Vec::new();
    for c in cases() {
        let (path, query) = split(c.client);
        let out = rules.rewrite(path, query, HOST);
        if out.uri() != c.backend || out.rule.as_deref() != Some(c.rule) {
            failures.push(format!(
                "{}: gateway sent {:?} via {:?}, expected {:?} via {:?}",
                c.client,
                out.uri(),
                out.rule,
                c.backend,
                c.rule
            ));
            continue;
        }
        let got = resolve(&c.method, &out.path, out.query.as_deref());
        match (&c.upstream, got) {
            (None, Ok(Route::Health)) => {}
            (Some((up_path, up_query, op)), Ok(Route::Upstream(t))) => {
                if t.path != *up_path || t.query != *up_query || t.operation != *op {
                    failures.push(format!(
                        "{}: handler forwards to {:?}?{:?} as {:?}, expected {:?}?{:?} as {:?}",
                        c.client, t.path, t.query, t.operation, up_path, up_query, op
                    ));
                }
            }
            (want, got) => failures.push(format!(
                "{}: handler resolved {} {:?} to {:?}, expected {:?}",
                c.client, c.method, out.path, got, want
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "rules and handler disagree:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_handler_operation_is_reachable_through_the_gateway() {
    let reached: Vec<Operation> = cases()
        .iter()
        .filter_map(|c| c.upstream.map(|(_, _, op)| op))
        .collect();
    for op in ALL_OPERATIONS {
        assert!(reached.contains(op), "no client URL reaches {op:?}");
    }
    assert!(cases().iter().any(|c| c.upstream.is_none()), "health case");
}

#[test]
fn the_health_rule_targets_the_handler_health_path() {
    let out = rules().rewrite("/openai/deployments/health/check", None, HOST);
    assert_eq!(out.path, HEALTH_PATH);
}

#[test]
fn paths_that_must_not_match_pass_unrewritten_and_are_refused() {
    let rules = rules();
    for &uri in MUST_NOT_MATCH {
        let (path, query) = split(uri);
        let query = query.or(Some(V));
        let out = rules.rewrite(path, query, HOST);
        assert_eq!(out.rule, None, "{uri} matched {:?}", out.applied);
        assert_eq!(out.path, path, "{uri}");
        assert_eq!(out.query.as_deref(), query, "{uri}");
        for method in [Method::GET, Method::POST] {
            let r = resolve(&method, &out.path, out.query.as_deref());
            assert!(r.is_err(), "{method} {uri} reached the handler as {r:?}");
        }
    }
}

#[test]
fn no_request_matches_two_rules() {
    let rules = rules();
    let mut uris: Vec<&str> = cases().iter().map(|c| c.client).collect();
    uris.extend_from_slice(MUST_NOT_MATCH);
    // Names that look like the fixed parts of other rules.
    uris.extend_from_slice(&[
        "/openai/deployments/chat/chat/completions",
        "/openai/deployments/extensions/chat/completions",
        "/openai/deployments/extensions/extensions/chat/completions",
        "/openai/deployments/health/extensions/chat/completions",
        "/openai/deployments/health/check/more",
        "/openai/deployments/v1/chat/completions",
        "/openai/deployments/x/chat/completions/extra",
        "/openai/deployments/x/extensions/chat",
        "/openai/v1/deployments/x/chat/completions",
    ]);
    for uri in uris {
        let (path, query) = split(uri);
        let m = rules.matching(path, query, HOST);
        assert!(m.len() <= 1, "{uri} matches {m:?}");
    }
}

#[test]
fn rewriting_is_idempotent() {
    let rules = rules();
    for c in cases() {
        let (path, query) = split(c.backend);
        let again = rules.rewrite(path, query, HOST);
        assert_eq!(again.rule, None, "{} matched again", c.backend);
        assert_eq!(again.uri(), c.backend);
    }
}

#[test]
fn the_query_string_is_never_touched() {
    let rules = rules();
    for q in [
        None,
        Some(""),
        Some("api-version=2024-10-21"),
        Some("a=1&a=2&b=%20x+y&c"),
        Some("api-version=2024-10-21&api-version=2024-02-01"),
    ] {
        let out = rules.rewrite("/openai/deployments/gpt-4o/chat/completions", q, HOST);
        assert_eq!(out.query.as_deref(), q);
        let out = rules.rewrite("/openai/v1/models", q, HOST);
        assert_eq!(out.query.as_deref(), q);
    }
}
