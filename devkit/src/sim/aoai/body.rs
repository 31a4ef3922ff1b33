//! Answer bodies sent on a schedule (time to first token, time per token) and, for the
//! `reset` failure, cut mid-body so the client sees a broken connection.

use super::*;

// ---------------------------------------------------------------------------------------------
// Bodies: timed, optionally cut.

/// One piece of a scripted body: wait, then send.
pub(super) struct Piece {
    pub(super) wait: Duration,
    pub(super) bytes: Bytes,
}

/// A body that sends its pieces on schedule; with `reset`, it fails after about half of them,
/// which makes hyper drop the connection mid-body (the client sees an incomplete message).
pub(super) fn scripted_body(pieces: Vec<Piece>, reset: bool) -> Body {
    let cut = if reset {
        Some((pieces.len() / 2).max(1))
    } else {
        None
    };
    // Total delay is bounded: each wait is capped and the sum is capped too.
    let mut budget = MAX_DELAY;
    let stream = futures_util::stream::unfold(
        (pieces.into_iter().enumerate(), cut, false),
        move |(mut it, cut, done)| {
            let next = if done { None } else { it.next() };
            let wait = next
                .as_ref()
                .map_or(Duration::ZERO, |(_, p)| p.wait.min(budget));
            budget = budget.saturating_sub(wait);
            async move {
                let (i, piece) = next?;
                if cut == Some(i) {
                    // Let hyper flush what was sent (it writes when the body is pending), so the
                    // client sees headers and part of the body before the cut.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    return Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "x-sim-fail: reset",
                        )),
                        (it, cut, true),
                    ));
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Some((Ok(piece.bytes), (it, cut, false)))
            }
        },
    );
    Body::from_stream(stream)
}

/// A JSON answer sent after the time the model would take to generate `completion` tokens.
pub(super) fn delayed_json(
    cfg: &AoaiConfig,
    completion: usize,
    body: Value,
    reset: bool,
) -> Response {
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let wait = (cfg.first_token + cfg.time_per_token * completion as u32).min(MAX_DELAY);
    let len = bytes.len();
    let pieces = if reset {
        let half = len / 2;
        vec![
            Piece {
                wait,
                bytes: Bytes::copy_from_slice(&bytes[..half]),
            },
            Piece {
                wait: Duration::ZERO,
                bytes: Bytes::copy_from_slice(&bytes[half..]),
            },
            Piece {
                wait: Duration::ZERO,
                bytes: Bytes::new(),
            },
        ]
    } else {
        vec![Piece {
            wait,
            bytes: Bytes::from(bytes),
        }]
    };
    let mut response = Response::new(scripted_body(pieces, reset));
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

pub(super) fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

pub(super) fn sse_response(pieces: Vec<Piece>, reset: bool) -> Response {
    let mut response = Response::new(scripted_body(pieces, reset));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}
