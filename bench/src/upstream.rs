//! Zero-latency upstreams: an AOAI chat-completions endpoint and a Content Safety endpoint, one
//! process, one thread (a current-thread tokio runtime, so it can be pinned to one core).
//!
//! AOAI (`POST /openai/deployments/{d}/chat/completions`): checks `api-key` is the real key (so
//! a proxy that forgot the key swap fails the run), reads the body, and answers either a fixed
//! chat completion JSON (with the headers AOAI sends) or, when the body asks for `"stream":true`,
//! an SSE stream of [`CHUNKS`] events [`GAP`] apart (event i at t0 + i × GAP, no drift).
//!
//! Content Safety (`POST /contentsafety/text:analyze|text:shieldPrompt?api-version=2024-09-01`):
//! checks `Ocp-Apim-Subscription-Key` and answers "nothing found" in the 2024-09-01 shapes.
//!
//! Prints `ready <aoai port> <content safety port>` on stdout once both listen.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};

/// SSE events per streamed answer (the last is `data: [DONE]`).
pub const CHUNKS: usize = 20;
/// Time between two events.
pub const GAP: Duration = Duration::from_millis(5);

const COMPLETION: &str = r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}},"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Why did the proxy cross the road? To forward the request to the other side.","refusal":null,"role":"assistant"}}],"created":1732000000,"id":"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012","model":"gpt-4o-2024-08-06","object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}],"system_fingerprint":"fp_d54531d9eb","usage":{"completion_tokens":18,"prompt_tokens":28,"total_tokens":46}}"#;
const ANALYZE: &str = r#"{"blocklistsMatch":[],"categoriesAnalysis":[{"category":"Hate","severity":0},{"category":"SelfHarm","severity":0},{"category":"Sexual","severity":0},{"category":"Violence","severity":0}]}"#;
const SHIELD: &str = r#"{"userPromptAnalysis":{"attackDetected":false},"documentsAnalysis":[]}"#;

type Reply = Response<Either<Full<Bytes>, Sse>>;

/// The streamed answer: event `i` is sent at `t0 + i × GAP`.
pub struct Sse {
    i: usize,
    t0: Instant,
    sleep: Pin<Box<Sleep>>,
}

fn event(i: usize) -> Bytes {
    if i + 1 == CHUNKS {
        return Bytes::from_static(b"data: [DONE]\n\n");
    }
    Bytes::from(format!(
        "data: {{\"choices\":[{{\"content_filter_results\":{{}},\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null,\"index\":0,\"logprobs\":null}}],\"created\":1732000000,\"id\":\"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012\",\"model\":\"gpt-4o-2024-08-06\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_d54531d9eb\"}}\n\n"
    ))
}

impl Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.i >= CHUNKS {
            return Poll::Ready(None);
        }
        if self.i > 0 {
            ready!(self.sleep.as_mut().poll(cx));
        }
        let i = self.i;
        self.i += 1;
        let next = self.t0 + GAP * (i as u32 + 1);
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(event(i)))))
    }
}

struct Keys {
    aoai: Vec<u8>,
    cs: Vec<u8>,
}

fn full(status: StatusCode, content_type: &'static str, body: &'static str) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))))
        .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn aoai(req: Request<Incoming>, keys: &'static Keys) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    if path == "/health" {
        return Ok(full(StatusCode::OK, "application/json", "{}"));
    }
    if req.method() != hyper::Method::POST
        || !path.starts_with("/openai/deployments/")
        || !path.ends_with("/chat/completions")
    {
        return Ok(full(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":{"code":"404","message":"Resource not found"}}"#,
        ));
    }
    if req.headers().get("api-key").map(|v| v.as_bytes()) != Some(&keys.aoai[..]) {
        return Ok(full(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key"}}"#,
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let b = Response::builder()
        .header("apim-request-id", "6a2c4f3e-0b1d-4e5f-8a9b-0c1d2e3f4a5b")
        .header("x-ms-region", "Sweden Central")
        .header("x-ratelimit-remaining-requests", "249")
        .header("x-ratelimit-remaining-tokens", "249000")
        .header("x-content-type-options", "nosniff")
        .header(
            "strict-transport-security",
            "max-age=31536000; includeSubDomains; preload",
        );
    if contains(&body, b"\"stream\":true") {
        let t0 = Instant::now();
        let sse = Sse {
            i: 0,
            t0,
            sleep: Box::pin(tokio::time::sleep_until(t0)),
        };
        return Ok(b
            .header("content-type", "text/event-stream; charset=utf-8")
            .header("cache-control", "no-cache, must-revalidate")
            .body(Either::Right(sse))
            .unwrap());
    }
    Ok(b.header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from_static(
            COMPLETION.as_bytes(),
        ))))
        .unwrap())
}

async fn content_safety(req: Request<Incoming>, keys: &'static Keys) -> Result<Reply, Infallible> {
    let key_ok = req
        .headers()
        .get("ocp-apim-subscription-key")
        .map(|v| v.as_bytes())
        == Some(&keys.cs[..]);
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("");
    let answer = match pq {
        "/contentsafety/text:analyze?api-version=2024-09-01" => ANALYZE,
        "/contentsafety/text:shieldPrompt?api-version=2024-09-01" => SHIELD,
        _ => {
            return Ok(full(
                StatusCode::NOT_FOUND,
                "application/json",
                r#"{"error":{"code":"NotFound","message":"no such operation"}}"#,
            ))
        }
    };
    let _ = req.into_body().collect().await;
    if !key_ok {
        return Ok(full(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":{"code":"401","message":"Access denied"}}"#,
        ));
    }
    Ok(full(StatusCode::OK, "application/json", answer))
}

async fn accept_loop<F, Fut>(listener: TcpListener, keys: &'static Keys, f: F)
where
    F: Fn(Request<Incoming>, &'static Keys) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = Result<Reply, Infallible>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(move |req| f(req, keys));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub fn main(args: &[String]) {
    let mut out_key = String::new();
    let mut cs_key = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out-key" => out_key = it.next().cloned().unwrap_or_default(),
            "--cs-key" => cs_key = it.next().cloned().unwrap_or_default(),
            other => panic!("upstream: unknown argument {other}"),
        }
    }
    let keys: &'static Keys = Box::leak(Box::new(Keys {
        aoai: out_key.into_bytes(),
        cs: cs_key.into_bytes(),
    }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let a = TcpListener::bind("127.0.0.1:0").await.expect("bind aoai");
        let c = TcpListener::bind("127.0.0.1:0").await.expect("bind cs");
        let (pa, pc) = (
            a.local_addr().unwrap().port(),
            c.local_addr().unwrap().port(),
        );
        let mut so = std::io::stdout();
        let _ = writeln!(so, "ready {pa} {pc}");
        let _ = so.flush();
        tokio::join!(
            accept_loop(a, keys, aoai),
            accept_loop(c, keys, content_safety)
        );
    });
}

/// Size of the non-streamed answer, for the report.
pub fn completion_len() -> usize {
    COMPLETION.len()
}
