//! The AOAI simulator, black-box: started on port 0, called over HTTP, and checked on both
//! sides (what the client got, what the simulator recorded).

use std::time::{Duration, Instant};

use fwdproxy_devkit::server::RunningServer;
use fwdproxy_devkit::sim::aoai::{self, AoaiConfig, AoaiSim};
use fwdproxy_devkit::sim::tokens;
use serde_json::{json, Value};
use std::sync::Arc;

const KEY: &str = "test-sim-key-0123456789";
const Q: &str = "api-version=2024-10-21";

struct Sim {
    server: RunningServer,
    sim: Arc<AoaiSim>,
    client: reqwest::Client,
}

impl Sim {
    async fn start(tweak: impl FnOnce(&mut AoaiConfig)) -> Self {
        let mut config = AoaiConfig {
            name: "sim-t".into(),
            key: KEY.into(),
            time_per_token: Duration::ZERO,
            first_token: Duration::ZERO,
            ..AoaiConfig::default()
        };
        tweak(&mut config);
        let (server, sim) = aoai::start(config, 0).await.unwrap();
        Sim {
            server,
            sim,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.server.url()))
            .header("api-key", KEY)
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

fn chat_path(deployment: &str) -> String {
    format!("/openai/deployments/{deployment}/chat/completions?{Q}")
}

fn hello(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello there, simulator!"}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// `data:` payloads of an SSE body, in order.
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Base64 (standard, padded) to little-endian f32s.
fn decode_f32s(b64: &str) -> Vec<f32> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let mut bytes = Vec::new();
    for chunk in b64.as_bytes().chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, c| (acc << 6) | val(*c));
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        bytes.extend_from_slice(&three[..3 - pad]);
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

async fn error_code(resp: reqwest::Response, status: u16) -> String {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body["error"]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn keys_are_checked_by_api_key_or_bearer() {
    let s = Sim::start(|_| {}).await;
    let url = format!("{}{}", s.server.url(), chat_path("gpt-4o"));
    let none = s
        .client
        .post(&url)
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(none, 401).await, "401");
    let wrong = s
        .client
        .post(&url)
        .header("api-key", "nope")
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let bearer = s
        .client
        .post(&url)
        .bearer_auth(KEY)
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    assert_eq!(
        s.post(&chat_path("gpt-4o"), hello(json!({})))
            .await
            .status(),
        200
    );
    assert_eq!(s.sim.recorder.total(), 4);
}

#[tokio::test]
async fn chat_usage_matches_the_content() {
    let s = Sim::start(|_| {}).await;
    let resp = s
        .post(&chat_path("gpt-4o"), hello(json!({"user": "alice"})))
        .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert!(h.contains_key("apim-request-id"));
    assert_eq!(h["x-sim-resource"], "sim-t");
    let remaining: u64 = h["x-ratelimit-remaining-requests"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 599);
    assert!(h.contains_key("x-ratelimit-remaining-tokens"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["prompt_filter_results"][0]["prompt_index"], 0);
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("sim-t"));
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], tokens::count(content) as u64);
    // 3 to prime + per message 3 + role + content.
    let expected_prompt = 3
        + (3 + tokens::count("system") + tokens::count("Be brief."))
        + (3 + tokens::count("user") + tokens::count("Hello there, simulator!"));
    assert_eq!(usage["prompt_tokens"], expected_prompt as u64);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // The simulator recorded the user field as sent.
    assert_eq!(s.sim.recorder.seen()[0].body["user"], "alice");
}

#[tokio::test]
async fn echo_max_tokens_and_n() {
    let s = Sim::start(|_| {}).await;
    let body = json!({"messages": [{"role": "user", "content": "echo: one two three four five"}],
                      "max_tokens": 3, "n": 2});
    let resp: Value = s
        .post(&chat_path("gpt-4o"), body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(resp["choices"].as_array().unwrap().len(), 2);
    assert_eq!(resp["choices"][0]["message"]["content"], "one two three");
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(resp["usage"]["completion_tokens"], 6);
    let bad = s
        .post(&chat_path("gpt-4o"), hello(json!({"max_tokens": 0})))
        .await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn streaming_chat_has_aoai_framing_and_consistent_usage() {
    let s = Sim::start(|_| {}).await;
    let plain: Value = s
        .post(&chat_path("gpt-4o"), hello(json!({})))
        .await
        .json()
        .await
        .unwrap();
    let resp = s
        .post(
            &chat_path("gpt-4o"),
            hello(json!({"stream": true, "stream_options": {"include_usage": true}})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let json: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // First: prompt filter results only.
    assert_eq!(json[0]["choices"], json!([]));
    assert_eq!(json[0]["id"], "");
    assert!(json[0]["prompt_filter_results"][0]["content_filter_results"].is_object());
    // Then the role.
    assert_eq!(json[1]["choices"][0]["delta"]["role"], "assistant");
    // Last before [DONE]: usage with no choices; others carry usage: null.
    let last = json.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(json[1..json.len() - 1].iter().all(|e| e["usage"].is_null()));
    let content_chunks: Vec<&str> = json
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        last["usage"]["completion_tokens"],
        content_chunks.len() as u64
    );
    assert_eq!(
        content_chunks.concat(),
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        last["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    let finish = &json[json.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");

    // Without include_usage: no usage chunk, no usage member.
    let text = s
        .post(&chat_path("gpt-4o"), hello(json!({"stream": true})))
        .await
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
}

#[tokio::test]
async fn streaming_is_paced_by_time_per_token() {
    let s = Sim::start(|c| {
        c.time_per_token = Duration::from_millis(20);
        c.first_token = Duration::from_millis(50);
    })
    .await;
    let started = Instant::now();
    let mut resp = s
        .post(
            &chat_path("gpt-4o"),
            json!({"messages": [{"role": "user", "content": "echo: a b c d e f g h i j"}], "stream": true}),
        )
        .await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("prompt_filter_results"));
    let mut rest = 0;
    while let Some(c) = resp.chunk().await.unwrap() {
        rest += c.len();
    }
    let total = started.elapsed();
    assert!(rest > 0);
    // 10 tokens × 20 ms + 50 ms: the whole stream takes at least 250 ms (a lower bound the
    // simulator's own pacing guarantees; a slow machine only makes it longer). No upper bound
    // on the first event's arrival: latency belongs in the benchmarks.
    assert!(total >= Duration::from_millis(250), "{total:?}");
}

#[tokio::test]
async fn embeddings_have_the_models_dimensions_and_are_deterministic() {
    let s = Sim::start(|_| {}).await;
    let path = |d: &str| format!("/openai/deployments/{d}/embeddings?{Q}");
    for (deployment, dims) in [
        ("text-embedding-ada-002", 1536),
        ("text-embedding-3-small", 1536),
        ("text-embedding-3-large", 3072),
    ] {
        let body: Value = s
            .post(
                &path(deployment),
                json!({"input": "hello world", "user": "bob"}),
            )
            .await
            .json()
            .await
            .unwrap();
        let v = body["data"][0]["embedding"].as_array().unwrap();
        assert_eq!(v.len(), dims, "{deployment}");
        let norm: f64 = v
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-3);
        assert_eq!(body["usage"]["prompt_tokens"], 2);
        assert_eq!(body["usage"]["total_tokens"], 2);
    }
    let a: Value = s
        .post(
            &path("text-embedding-3-small"),
            json!({"input": ["a", "b"], "dimensions": 256}),
        )
        .await
        .json()
        .await
        .unwrap();
    let b: Value = s
        .post(
            &path("text-embedding-3-small"),
            json!({"input": ["a", "b"], "dimensions": 256}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a["data"].as_array().unwrap().len(), 2);
    assert_eq!(a["data"][1]["index"], 1);
    assert_eq!(a["data"][0]["embedding"].as_array().unwrap().len(), 256);
    assert_eq!(a["data"], b["data"]);
    assert_ne!(a["data"][0]["embedding"], a["data"][1]["embedding"]);
    // ada-002 cannot shorten.
    let resp = s
        .post(
            &path("text-embedding-ada-002"),
            json!({"input": "a", "dimensions": 256}),
        )
        .await;
    assert_eq!(error_code(resp, 400).await, "BadRequest");
    // base64: little-endian f32, as the OpenAI SDKs request by default.
    let body: Value = s
        .post(
            &path("text-embedding-3-large"),
            json!({"input": "x", "encoding_format": "base64"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let b64 = body["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(b64.len(), 4 * (3072usize * 4).div_ceil(3));
    let floats: Value = s
        .post(&path("text-embedding-3-large"), json!({"input": "x"}))
        .await
        .json()
        .await
        .unwrap();
    let decoded = decode_f32s(b64);
    assert_eq!(decoded.len(), 3072);
    for (d, f) in decoded
        .iter()
        .zip(floats["data"][0]["embedding"].as_array().unwrap())
    {
        assert!((f64::from(*d) - f.as_f64().unwrap()).abs() < 1e-6);
    }
    // Wrong operation for the model.
    let resp = s
        .post(&chat_path("text-embedding-3-small"), hello(json!({})))
        .await;
    assert_eq!(error_code(resp, 400).await, "OperationNotSupported");
    let resp = s.post(&path("gpt-4o"), json!({"input": "x"})).await;
    assert_eq!(error_code(resp, 400).await, "OperationNotSupported");
}

#[tokio::test]
async fn completions_extensions_and_v1() {
    let s = Sim::start(|_| {}).await;
    let body: Value = s
        .post(
            &format!("/openai/deployments/gpt-35-turbo-instruct/completions?{Q}"),
            json!({"prompt": "Say something", "max_tokens": 5}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "text_completion");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        body["usage"]["completion_tokens"],
        tokens::count(text) as u64
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let stream = s
        .post(
            &format!("/openai/deployments/gpt-35-turbo-instruct/completions?{Q}"),
            json!({"prompt": "echo: hi there", "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events = sse_events(&stream);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let texts: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| e["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(texts, "hi there");

    let ext: Value = s
        .post(
            &format!("/openai/deployments/gpt-4o/extensions/chat/completions?{Q}"),
            hello(json!({"dataSources": [{"type": "AzureCognitiveSearch", "parameters": {}}]})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(ext["choices"][0]["message"]["context"]["citations"].is_array());

    let v1: Value = s
        .post(
            "/openai/v1/chat/completions",
            hello(json!({"model": "gpt-4o-mini"})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v1["model"], "gpt-4o-mini");
    let resp = s
        .post("/openai/v1/chat/completions", hello(json!({})))
        .await;
    assert_eq!(error_code(resp, 400).await, "BadRequest");
    let emb: Value = s
        .post(
            "/openai/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "x"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(emb["data"][0]["embedding"].as_array().unwrap().len(), 1536);
    let models: Value = s
        .req(reqwest::Method::GET, "/openai/v1/models")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "gpt-4o"));
    let responses: Value = s
        .post(
            "/openai/v1/responses",
            json!({"model": "gpt-4o", "input": "echo: done"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(responses["output"][0]["content"][0]["text"], "done");
    assert_eq!(responses["usage"]["output_tokens"], 1);
}

#[tokio::test]
async fn routes_versions_and_deployments_are_checked() {
    let s = Sim::start(|c| c.deployments = Some(vec![aoai::Deployment::named("gpt-4o")])).await;
    let resp = s
        .post(
            "/openai/deployments/gpt-4o/chat/completions",
            hello(json!({})),
        )
        .await;
    assert_eq!(error_code(resp, 400).await, "BadRequest");
    let resp = s.post(&chat_path("other"), hello(json!({}))).await;
    assert_eq!(error_code(resp, 404).await, "DeploymentNotFound");
    let resp = s.post("/openai/nothing", json!({})).await;
    assert_eq!(error_code(resp, 404).await, "404");
    let resp = s
        .req(reqwest::Method::GET, &chat_path("gpt-4o"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let resp = s.post(&chat_path("gpt-4o"), json!({"nope": 1})).await;
    assert_eq!(error_code(resp, 400).await, "BadRequest");
    let resp = s
        .req(reqwest::Method::POST, &chat_path("gpt-4o"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn forced_429_carries_retry_headers() {
    let s = Sim::start(|_| {}).await;
    let resp = s
        .req(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("x-sim-ratelimit", "3")
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "3");
    assert_eq!(resp.headers()["retry-after-ms"], "3000");
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(error_code(resp, 429).await, "429");
}

#[tokio::test]
async fn rpm_and_tpm_limits_answer_429_per_deployment() {
    let s = Sim::start(|c| {
        c.rpm = 2;
        c.tpm = 0;
    })
    .await;
    for expected in ["1", "0"] {
        let r = s.post(&chat_path("gpt-4o"), hello(json!({}))).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], expected);
    }
    let r = s.post(&chat_path("gpt-4o"), hello(json!({}))).await;
    // One request per 30 s refills: retry after about 30 s.
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let ms: u64 = r.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&secs), "{secs}");
    assert!((28_000..=30_000).contains(&ms), "{ms}");
    assert!(r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ChatCompletions_Create"));
    // Another deployment has its own quota.
    assert_eq!(
        s.post(&chat_path("gpt-4o-mini"), hello(json!({})))
            .await
            .status(),
        200
    );

    let t = Sim::start(|c| {
        c.rpm = 0;
        c.tpm = 60;
    })
    .await;
    let r = t.post(&chat_path("gpt-4o"), hello(json!({}))).await;
    assert_eq!(r.status(), 200);
    let left: u64 = r.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 60);
    // Each identical request costs the same; the quota refills at 1 token/s, so at most
    // left / cost more fit (one more if a slow machine let the refill catch up), then 429.
    let cost = 60 - left;
    let fits = (left / cost) as usize;
    let mut statuses = Vec::new();
    for _ in 0..fits + 2 {
        let status = t
            .post(&chat_path("gpt-4o"), hello(json!({})))
            .await
            .status();
        statuses.push(status.as_u16());
        if status == 429 {
            break;
        }
    }
    let first_429 = statuses.iter().position(|s| *s == 429);
    assert!(
        first_429.is_some_and(|n| n >= fits && n <= fits + 1),
        "cost {cost}, left {left}: {statuses:?}"
    );
    assert!(
        statuses[..first_429.unwrap()].iter().all(|s| *s == 200),
        "{statuses:?}"
    );
}

/// A header as a whole number (panics with the header's name when it is missing or not one).
fn header_u64(r: &reqwest::Response, name: &str) -> u64 {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a whole number"))
}

/// Post until the first 429 (at most `max` tries) and return it.
async fn first_429(s: &Sim, max: usize) -> reqwest::Response {
    for _ in 0..max {
        let r = s.post(&chat_path("gpt-4o"), hello(json!({}))).await;
        if r.status() == 429 {
            return r;
        }
        assert_eq!(r.status(), 200);
    }
    panic!("no 429 within {max} requests");
}

#[tokio::test]
async fn a_429_says_which_limit_bit_and_how_long_to_wait() {
    // Token-throttled: requests remain, tokens do not; both retry headers agree.
    let t = Sim::start(|c| {
        c.rpm = 600;
        c.tpm = 60;
    })
    .await;
    let r = first_429(&t, 10).await;
    let ms = header_u64(&r, "retry-after-ms");
    let secs = header_u64(&r, "retry-after");
    assert!(ms > 0 && ms <= 60_000, "{ms}");
    assert_eq!(
        secs,
        ms.div_ceil(1000),
        "retry-after is retry-after-ms rounded up"
    );
    let requests_left = header_u64(&r, "x-ratelimit-remaining-requests");
    assert!(
        requests_left >= 590,
        "a token-throttled 429 still shows the requests left: {requests_left}"
    );
    assert!(header_u64(&r, "x-ratelimit-remaining-tokens") < 60);
    assert_eq!(error_code(r, 429).await, "429");

    // Request-throttled: no requests left, tokens plenty.
    let q = Sim::start(|c| {
        c.rpm = 1;
        c.tpm = 100_000;
    })
    .await;
    let r = first_429(&q, 3).await;
    assert_eq!(header_u64(&r, "x-ratelimit-remaining-requests"), 0);
    assert!(header_u64(&r, "x-ratelimit-remaining-tokens") > 99_000);
    let ms = header_u64(&r, "retry-after-ms");
    assert_eq!(header_u64(&r, "retry-after"), ms.div_ceil(1000));
    assert!(
        (58_000..=60_000).contains(&ms),
        "one request a minute: {ms}"
    );
}

#[tokio::test]
async fn injected_failures() {
    let s = Sim::start(|_| {}).await;
    let with = |v: &str| {
        s.req(reqwest::Method::POST, &chat_path("gpt-4o"))
            .header("x-sim-fail", v)
            .json(&hello(json!({})))
            .send()
    };
    assert_eq!(
        error_code(with("500").await.unwrap(), 500).await,
        "InternalServerError"
    );
    assert_eq!(
        error_code(with("503").await.unwrap(), 503).await,
        "ServiceUnavailable"
    );
    let started = Instant::now();
    assert_eq!(with("slow:300").await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Reset: headers arrive, the body breaks.
    let resp = with("reset").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    let resp = s
        .req(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("x-sim-fail", "reset")
        .json(&hello(json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err());
    assert_eq!(with("bogus").await.unwrap().status(), 400);

    // A configured failure rate of 1 fails everything with the configured kind.
    let f = Sim::start(|c| {
        c.failure_rate = 1.0;
        c.failure_kind = aoai::FailureKind::Status(503);
    })
    .await;
    assert_eq!(
        f.post(&chat_path("gpt-4o"), hello(json!({})))
            .await
            .status(),
        503
    );
}
