//! Black-box tests of the request path: the app on port 0 against a mock AOAI.

use crate::common;

use std::time::Duration;

use common::support::aoai::refusing_port;
use common::support::wait::within;
use common::*;
use futures_util::StreamExt;

const CHAT: &str = r#"{"messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test]
async fn health_needs_no_key_and_never_calls_aoai() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let resp = app
        .client
        .get(app.url("/api/FwdProxy/openai/deployments/health/check"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-request-id").is_some());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert!(aoai.seen().is_empty());
}

// Every route, method and bad path, with what the upstream saw: tests/it/routes.rs.

#[tokio::test]
async fn answer_passes_back_unchanged() {
    let aoai = MockAoai::start().await;
    let body = r#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"total_tokens":3}}"#;
    aoai.reply(Reply::Fixed(
        200,
        vec![
            ("content-type", "application/json; charset=utf-8"),
            ("apim-request-id", "apim-123"),
            ("x-ratelimit-remaining-requests", "99"),
            ("x-ratelimit-remaining-tokens", "9000"),
        ],
        body,
    ));
    let app = TestApp::start(&aoai.base(), &[]).await;
    let resp = app
        .post(
            &format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"),
            CHAT,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "application/json; charset=utf-8");
    assert_eq!(h["apim-request-id"], "apim-123");
    assert_eq!(h["x-ratelimit-remaining-requests"], "99");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "9000");
    assert_eq!(resp.text().await.unwrap(), body);
    assert_eq!(aoai.only().body, CHAT.as_bytes());
}

#[tokio::test]
async fn throttling_passes_through_with_retry_after() {
    let aoai = MockAoai::start().await;
    let body = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded call rate limit."}}"#;
    aoai.reply(Reply::Fixed(
        429,
        vec![
            ("content-type", "application/json"),
            ("retry-after", "7"),
            ("retry-after-ms", "6500"),
        ],
        body,
    ));
    let app = TestApp::start(&aoai.base(), &[]).await;
    let resp = app
        .post(
            &format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"),
            CHAT,
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["retry-after-ms"], "6500");
    assert_eq!(resp.text().await.unwrap(), body);
}

#[tokio::test]
async fn missing_or_wrong_key_is_401_and_upstream_sees_nothing() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let url = app.url(&format!(
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
    ));
    let attempts = [
        app.client.post(&url).body(CHAT),
        app.client
            .post(&url)
            .header("api-key", "wrong-key-0123456789abcdef")
            .body(CHAT),
        app.client
            .post(&url)
            .header("authorization", "Bearer wrong-key-0123456789")
            .body(CHAT),
        app.client
            .post(&url)
            .header("authorization", format!("Basic {IN_KEY}"))
            .body(CHAT),
        // the real AOAI key is not an internal key
        app.client.post(&url).header("api-key", OUT_KEY).body(CHAT),
    ];
    for attempt in attempts {
        let resp = attempt.send().await.unwrap();
        assert_eq!(assert_aoai_error(resp, 401).await, "401");
    }
    aoai.assert_untouched("an unauthenticated request");
}

#[tokio::test]
async fn bearer_and_named_callers_are_accepted() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let url = app.url(&format!(
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
    ));
    for auth in [format!("Bearer {IN_KEY}"), format!("Bearer {OTHER_KEY}")] {
        let resp = app
            .client
            .post(&url)
            .header("authorization", auth)
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(aoai.seen().len(), 2);
}

#[tokio::test]
async fn upstream_gets_the_real_key_and_none_of_the_inbound_secrets() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let resp = app
        .client
        .post(app.url(&format!(
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}&code=function-key-secret&extra=1"
        )))
        .header("api-key", IN_KEY)
        .header("authorization", format!("Bearer {IN_KEY}"))
        .header("x-functions-key", "function-key-secret")
        .header("x-azure-functions-invocationid", "inv-1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("x-request-id", "client-req-42")
        .header("x-ms-useragent", "AzureOpenAI-SDK")
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-req-42");

    let seen = aoai.only();
    assert_eq!(seen.headers["api-key"], OUT_KEY);
    assert_eq!(seen.headers.get_all("api-key").iter().count(), 1);
    for gone in [
        "authorization",
        "x-functions-key",
        "x-azure-functions-invocationid",
        "x-hop",
    ] {
        assert!(seen.headers.get(gone).is_none(), "{gone} reached AOAI");
    }
    assert_eq!(seen.headers["host"], aoai.addr.to_string());
    assert_eq!(seen.headers["x-request-id"], "client-req-42");
    assert_eq!(seen.headers["x-ms-useragent"], "AzureOpenAI-SDK");
    assert_eq!(seen.query.as_deref(), Some(&*format!("{API}&extra=1")));
    let all_headers = format!("{:?}", seen.headers);
    assert!(!all_headers.contains(IN_KEY) && !all_headers.contains("function-key-secret"));
}

#[tokio::test]
async fn request_id_is_created_when_missing_or_unsafe() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let url = app.url(&format!(
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
    ));
    let a = app
        .client
        .post(&url)
        .header("api-key", IN_KEY)
        .body(CHAT)
        .send()
        .await
        .unwrap();
    let b = app
        .client
        .post(&url)
        .header("api-key", IN_KEY)
        .header("x-request-id", "bad id with spaces")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    let (a, b) = (
        a.headers()["x-request-id"].clone(),
        b.headers()["x-request-id"].clone(),
    );
    assert_eq!(a.len(), 36);
    assert_eq!(b.len(), 36);
    assert_ne!(a, b);
    let seen = aoai.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers["x-request-id"], a);
    assert_eq!(seen[1].headers["x-request-id"], b);
}

#[tokio::test]
async fn streaming_chunks_are_not_buffered() {
    let aoai = MockAoai::start().await;
    let chunks: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
            )
        })
        .chain(std::iter::once("data: [DONE]\n\n".to_string()))
        .collect();
    // The upstream sends chunk n+1 only after the client received chunk n: a proxy that
    // buffered (the whole stream, or one chunk) would never deliver, and the bounded wait fails.
    aoai.reply(Reply::Gated(chunks.clone()));
    let app = TestApp::start(&aoai.base(), &[]).await;
    let resp = app
        .post(
            &format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"),
            r#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut received = Vec::new();
    for (n, chunk) in chunks.iter().enumerate() {
        let want = chunks[..=n].concat();
        while received.len() < want.len() {
            let got = within(
                PATIENCE,
                &format!("chunk {n} before chunk {}", n + 1),
                stream.next(),
            )
            .await
            .expect("stream ended early")
            .unwrap();
            received.extend_from_slice(&got);
        }
        assert_eq!(
            String::from_utf8_lossy(&received),
            want,
            "after chunk {n}: {chunk}"
        );
        aoai.release(1);
    }
    let end = within(PATIENCE, "end of stream", stream.next()).await;
    assert!(end.is_none(), "nothing after [DONE]");
    assert_eq!(
        aoai.only().path,
        "/openai/deployments/gpt-4o/chat/completions"
    );
}

#[tokio::test]
async fn upstream_down_is_502() {
    let refusing = refusing_port();
    let app = TestApp::start(&refusing.url, &[]).await;
    let resp = app
        .post(
            &format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"),
            CHAT,
        )
        .await;
    assert_eq!(assert_aoai_error(resp, 502).await, "upstream_unreachable");
}

#[tokio::test]
async fn upstream_slow_is_504() {
    let aoai = MockAoai::start().await;
    aoai.reply(Reply::Slow(Duration::from_secs(30)));
    let app = TestApp::start(
        &aoai.base(),
        &[
            ("AOAI_TIMEOUT_MS", "300"),
            ("AOAI_CONNECT_TIMEOUT_MS", "200"),
        ],
    )
    .await;
    // The upstream answers after 30 s, the timeout is 300 ms: a 504 at all (within the
    // generous bound) proves the timeout fired; no latency threshold needed.
    let resp = within(
        PATIENCE,
        "the 504",
        app.post(
            &format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"),
            CHAT,
        ),
    )
    .await;
    assert_eq!(assert_aoai_error(resp, 504).await, "upstream_timeout");
    assert_eq!(aoai.only().body, CHAT.as_bytes());
}

#[tokio::test]
async fn bad_paths_are_400_unknown_paths_404() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    for path in [
        format!("/api/FwdProxy/openai/deployments/a%2Fb/chatcompletions?{API}"),
        format!("/api/FwdProxy/openai/deployments/..%2F..%2Fadmin/chatcompletions?{API}"),
        format!("/api/FwdProxy/openai/deployments//chatcompletions?{API}"),
        format!("/api/FwdProxy/openai/deployments/x%0Ay/chatcompletions?{API}"),
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions".to_string(),
        "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?api-version=1&api-version=2"
            .to_string(),
    ] {
        let resp = app.post(&path, CHAT).await;
        let code = assert_aoai_error(resp, 400).await;
        assert!(
            code == "invalid_path" || code == "invalid_query",
            "{path}: {code}"
        );
    }
    for path in [
        "/",
        "/api/other",
        "/api/FwdProxy/openai/deployments/gpt-4o/fine-tunes?api-version=1",
    ] {
        let resp = app.post(path, CHAT).await;
        assert_eq!(assert_aoai_error(resp, 404).await, "404");
    }
    let resp = app
        .client
        .get(app.url(&format!(
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
        )))
        .header("api-key", IN_KEY)
        .send()
        .await
        .unwrap();
    assert_aoai_error(resp, 405).await;
    assert!(aoai.seen().is_empty());
}

#[tokio::test]
async fn oversize_body_is_413() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[("MAX_BODY_BYTES", "1000")]).await;
    let url = format!("/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}");
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );

    // Declared length over the limit: refused before anything is sent upstream.
    let resp = app.post(&url, &big).await;
    assert_eq!(assert_aoai_error(resp, 413).await, "request_too_large");
    assert!(aoai.seen().is_empty());

    // Chunked body that grows past the limit while streaming.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..20)
        .map(|_| Ok(bytes::Bytes::from(vec![b'x'; 100])))
        .collect();
    let resp = app
        .client
        .post(app.url(&url))
        .header("api-key", IN_KEY)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(assert_aoai_error(resp, 413).await, "request_too_large");
    // A streamed body is forwarded as it arrives: the upstream may have seen the start of it,
    // but never the whole oversize body as a complete request.
    for seen in aoai.seen() {
        assert!(
            seen.body_error.is_some() && seen.body.len() <= 1000,
            "an oversize body reached AOAI complete: {} bytes",
            seen.body.len()
        );
    }
    let before = aoai.seen().len();

    // Under the limit still passes.
    let resp = app.post(&url, CHAT).await;
    assert_eq!(resp.status(), 200);
    let seen = aoai.seen();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(seen[before].body, CHAT.as_bytes());
    assert!(seen[before].body_error.is_none());
}

#[tokio::test]
async fn multipart_and_binary_bodies_pass_untouched() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n".to_vec();
    body.extend((0u8..=255).cycle().take(4096));
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    let resp = app
        .client
        .post(app.url(&format!(
            "/api/FwdProxy/openai/deployments/whisper/audio/transcriptions?{API}"
        )))
        .header("api-key", IN_KEY)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = aoai.only();
    assert_eq!(seen.body.as_ref(), body.as_slice());
    assert_eq!(
        seen.headers["content-type"],
        "multipart/form-data; boundary=XyZ"
    );
    assert_eq!(seen.headers["content-length"], body.len().to_string());
}

#[tokio::test]
async fn chunked_request_bodies_stream_upstream() {
    let aoai = MockAoai::start().await;
    let app = TestApp::start(&aoai.base(), &[]).await;
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
        Ok(bytes::Bytes::from_static(b"{\"messages\":")),
        Ok(bytes::Bytes::from_static(
            b"[{\"role\":\"user\",\"content\":\"hi\"}]}",
        )),
    ];
    let resp = app
        .client
        .post(app.url(&format!(
            "/api/FwdProxy/openai/deployments/gpt-4o/chatcompletions?{API}"
        )))
        .header("api-key", IN_KEY)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        aoai.only().body.as_ref(),
        br#"{"messages":[{"role":"user","content":"hi"}]}"#
    );
}

mod request_id_property {
    use aoai_fwdproxy::app::request_id;
    use http::{HeaderMap, HeaderValue};
    use proptest::prelude::*;

    fn sane(b: &[u8]) -> bool {
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    }

    /// Any byte string a header value can hold (visible ASCII, space, tab, obs-text), and the
    /// shapes near the rule's edges.
    fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(
                prop_oneof![0x20u8..=0x7e, Just(b'\t'), 0x80u8..=0xff],
                0..200
            ),
            "[A-Za-z0-9_.:-]{0,140}".prop_map(String::into_bytes),
            "[A-Za-z0-9_.:-]{120,135}".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// The id we log and send upstream is always a valid, bounded, printable header value:
        /// the client's own when it is a sane token, otherwise a fresh lowercase UUID.
        #[test]
        fn request_id_is_always_a_sane_token(
            values in prop::collection::vec(header_bytes(), 0..3),
        ) {
            let mut headers = HeaderMap::new();
            for v in &values {
                headers.append("x-request-id", HeaderValue::from_bytes(v).unwrap());
            }
            let id = request_id(&headers);
            let b = id.as_bytes();
            prop_assert!(sane(b), "{:?}", id);
            prop_assert!(HeaderValue::from_bytes(b).is_ok());
            prop_assert!(!id.is_sensitive());
            match values.first() {
                Some(first) if sane(first) => prop_assert_eq!(b, first.as_slice()),
                _ => {
                    prop_assert_eq!(b.len(), 36);
                    let parsed = uuid::Uuid::parse_str(id.to_str().unwrap());
                    prop_assert!(parsed.is_ok(), "{:?}", id);
                    prop_assert_eq!(parsed.unwrap().get_version_num(), 4);
                }
            }
        }
    }
}
