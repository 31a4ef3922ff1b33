//! The Responses API of the v1 surface: `POST /openai/v1/responses` (JSON or SSE, `background`,
//! `previous_response_id`), `GET`/`DELETE /responses/{id}`, `GET …/input_items`, `POST …/cancel`.
//!
//! Shapes as the AOAI v1 reference and the OpenAI SDK's types give them. A stream is
//! `event: <type>` + `data: <json>` pairs with a `sequence_number` counting from 0:
//! `response.created`, `response.in_progress`, for a reasoning model a `reasoning` output item
//! (`response.output_item.added`/`.done`), then the message item: `response.output_item.added`,
//! `response.content_part.added`, one `response.output_text.delta` per token,
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, and
//! last `response.completed` (or `response.incomplete` when `max_output_tokens` cut the text)
//! whose response carries `usage` with `input_tokens_details.cached_tokens` and
//! `output_tokens_details.reasoning_tokens`. `usage.output_tokens` is the number of deltas plus
//! the reasoning tokens, so the token-governance work can check usage against content exactly.
//!
//! Stored responses (`store` defaults to true) live in a bounded map. A `background` response
//! answers at once with status `queued`; polling sees `queued` until the first token is due,
//! `in_progress` until the last, then the finished response; `cancel` stops it (`cancelled`).
//! Status is computed from the clock on each read, so no task runs per response.
//! `GET /responses/{id}?stream=true&starting_after=N` replays the stored stream after event `N`
//! (how a client resumes a dropped background stream).

use std::collections::{HashMap, VecDeque};

use super::*;

/// Stored responses kept, oldest dropped first (a demo session must not grow without end).
const MAX_STORED: usize = 1000;

#[derive(Default)]
pub(super) struct Store {
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    map: HashMap<String, Stored>,
    order: VecDeque<String>,
}

struct Stored {
    /// The response once finished (`completed` or `incomplete`).
    done: Value,
    /// The request's input as items, oldest first, each with an id.
    input_items: Vec<Value>,
    background: bool,
    /// A background response is `queued` until `first_at`, `in_progress` until `ready_at`.
    first_at: Instant,
    ready_at: Instant,
    cancelled: bool,
    /// Input and output tokens: what a follow-up with `previous_response_id` carries along.
    context_tokens: usize,
    /// The stream's events, for `GET …?stream=true&starting_after=N`.
    events: Vec<Value>,
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: String, stored: Stored) {
        let mut s = self.lock();
        if s.order.len() >= MAX_STORED {
            if let Some(old) = s.order.pop_front() {
                s.map.remove(&old);
            }
        }
        s.order.push_back(id.clone());
        s.map.insert(id, stored);
    }
}

impl Stored {
    /// The response as a reader sees it now.
    fn view(&self, now: Instant) -> Value {
        let mut v = self.done.clone();
        let status = if self.cancelled {
            "cancelled"
        } else if !self.background || now >= self.ready_at {
            return v;
        } else if now < self.first_at {
            "queued"
        } else {
            "in_progress"
        };
        v["status"] = json!(status);
        v["output"] = json!([]);
        v["usage"] = Value::Null;
        v["incomplete_details"] = Value::Null;
        v
    }
}

fn not_found_response(id: &str) -> Response {
    json_response(
        404,
        &json!({"error": {"code": "not_found", "message": format!("Response with id '{id}' not found."),
            "param": null, "type": "invalid_request_error"}}),
    )
}

/// Text of one input item, and the item as `input_items` lists it.
fn input_item(item: &Value, id: String) -> Option<(String, Value)> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    if kind == "message" || item.get("role").is_some() {
        let role = item.get("role").and_then(Value::as_str)?;
        let content = item.get("content")?;
        let text = content_text(content);
        let parts = match content {
            Value::String(s) => json!([{"type": "input_text", "text": s}]),
            other => other.clone(),
        };
        return Some((
            text,
            json!({"id": id, "type": "message", "role": role, "status": "completed", "content": parts}),
        ));
    }
    // Tool results and other items: their `output` (or `text`) is what the model reads.
    let text = item
        .get("output")
        .or_else(|| item.get("text"))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => content_text(other),
        })
        .unwrap_or_default();
    let mut listed = item.clone();
    if listed.get("id").is_none() {
        listed["id"] = json!(id);
    }
    Some((text, listed))
}

/// Everything the answer needs from the request.
struct Request {
    id: String,
    msg_id: String,
    created_at: u64,
    model: String,
    body: Value,
    input_tokens: usize,
    cached_tokens: usize,
    reasoning_tokens: usize,
    choice: Choice,
    input_items: Vec<Value>,
    stream: bool,
    background: bool,
    store: bool,
}

pub(super) fn plan(sim: &AoaiSim, at: &Deployed<'_>, body: &Value) -> Result<Plan, Reject> {
    let ModelKind::Chat { reasoning } = at.kind else {
        return Err(operation_not_supported("responses", at.model));
    };
    let hex = sim.new_id().replace('-', "");
    let raw_items: Vec<Value> = match body.get("input") {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(items)) if !items.is_empty() => items.clone(),
        _ => {
            return Err(invalid_request(
                "Missing required parameter: 'input'.",
                "input",
            ))
        }
    };
    let mut input_items = Vec::with_capacity(raw_items.len());
    let mut input_tokens = 0;
    let mut last_user = String::new();
    for (i, item) in raw_items.iter().enumerate() {
        let Some((text, listed)) = input_item(item, format!("msg_{hex}{i:04}")) else {
            return Err(invalid_request(
                &format!("Invalid value for 'input[{i}]': expected a message or an item."),
                "input",
            ));
        };
        input_tokens += 3 + tokens::count(&text);
        if listed["role"] == "user" {
            last_user = text;
        }
        input_items.push(listed);
    }
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        input_tokens += 3 + tokens::count(instructions);
    }
    let mut cached_tokens = 0;
    if let Some(prev) = body.get("previous_response_id").and_then(Value::as_str) {
        let store = sim.responses.lock();
        let Some(p) = store.map.get(prev) else {
            return Err(invalid_request(
                &format!("Previous response with id '{prev}' not found."),
                "previous_response_id",
            ));
        };
        input_tokens += p.context_tokens;
        // Prompt caching works on 128-token blocks past the first 1024 tokens.
        if p.context_tokens >= 1024 {
            cached_tokens = p.context_tokens / 128 * 128;
        }
    }
    let flag = |name: &str, default: bool| -> Result<bool, Reject> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid_request(
                &format!("Invalid type for '{name}': expected a boolean."),
                name,
            )),
        }
    };
    let stream = flag("stream", false)?;
    let background = flag("background", false)?;
    let store = flag("store", true)?;
    if background && !store {
        return Err(invalid_request(
            "Background mode requires 'store' to be true.",
            "background",
        ));
    }
    let choice = answer(sim, at.deployment, &last_user, 0, max_tokens(body)?);
    let reasoning_tokens = if reasoning {
        8 + (stable_hash(&[last_user.as_bytes()]) % 24) as usize
    } else {
        0
    };
    let created_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let req = Request {
        id: format!("resp_{hex}"),
        msg_id: format!("msg_{hex}"),
        created_at,
        model: at.model.to_string(),
        body: body.clone(),
        input_tokens,
        cached_tokens,
        reasoning_tokens,
        choice,
        input_items,
        stream,
        background,
        store,
    };
    let tokens = req.input_tokens + req.reasoning_tokens + req.choice.tokens.len();
    Ok(Plan::Custom {
        tokens,
        respond: Box::new(move |sim, reset| respond(sim, req, reset)),
    })
}

fn respond(sim: &AoaiSim, req: Request, reset: bool) -> Response {
    let cfg = &sim.config;
    let n = req.choice.tokens.len();
    let done = finished(&req);
    if req.store {
        let now = Instant::now();
        let first_at = now + cfg.first_token.min(MAX_DELAY);
        let ready_at = now + (cfg.first_token + cfg.time_per_token * n as u32).min(MAX_DELAY);
        sim.responses.insert(
            req.id.clone(),
            Stored {
                done: done.clone(),
                input_items: req.input_items.clone(),
                background: req.background,
                first_at,
                ready_at,
                cancelled: false,
                context_tokens: req.input_tokens + n + req.reasoning_tokens,
                events: events(cfg, &req, &done)
                    .into_iter()
                    .map(|(_, e)| e)
                    .collect(),
            },
        );
    }
    if req.stream {
        return stream(cfg, &req, &done, reset);
    }
    if req.background {
        let mut queued = done;
        queued["status"] = json!("queued");
        queued["output"] = json!([]);
        queued["usage"] = Value::Null;
        queued["incomplete_details"] = Value::Null;
        return delayed_json(
            &AoaiConfig {
                first_token: Duration::ZERO,
                time_per_token: Duration::ZERO,
                ..cfg.clone()
            },
            0,
            queued,
            reset,
        );
    }
    delayed_json(cfg, n, done, reset)
}

/// The response object with `status`, `output` and `usage` as given.
fn envelope(req: &Request, status: &str, output: Value, usage: Value) -> Value {
    let b = &req.body;
    let get = |k: &str| b.get(k).cloned().unwrap_or(Value::Null);
    let or = |k: &str, d: Value| b.get(k).cloned().filter(|v| !v.is_null()).unwrap_or(d);
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": req.id,
        "object": "response",
        "created_at": req.created_at,
        "status": status,
        "background": req.background,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": get("instructions"),
        "max_output_tokens": get("max_output_tokens"),
        "model": req.model,
        "output": output,
        "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
        "previous_response_id": get("previous_response_id"),
        "reasoning": if req.reasoning_tokens > 0 {
            or("reasoning", json!({"effort": "medium", "summary": null}))
        } else {
            json!({"effort": null, "summary": null})
        },
        "store": req.store,
        "temperature": or("temperature", json!(1.0)),
        "text": or("text", json!({"format": {"type": "text"}})),
        "tool_choice": or("tool_choice", json!("auto")),
        "tools": or("tools", json!([])),
        "top_p": or("top_p", json!(1.0)),
        "truncation": or("truncation", json!("disabled")),
        "usage": usage,
        "user": get("user"),
        "metadata": or("metadata", json!({})),
    })
}

fn reasoning_item(req: &Request) -> Value {
    json!({"id": format!("rs_{}", &req.id[5..]), "type": "reasoning", "summary": []})
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(req: &Request, status: &str, content: Value) -> Value {
    json!({"id": req.msg_id, "type": "message", "status": status, "role": "assistant",
           "content": content})
}

fn final_status(req: &Request) -> &'static str {
    if req.choice.finish_reason == "length" {
        "incomplete"
    } else {
        "completed"
    }
}

/// The finished response, as `POST` (without stream) and `GET` answer it.
fn finished(req: &Request) -> Value {
    let text = req.choice.tokens.concat();
    let n = req.choice.tokens.len();
    let mut output = Vec::new();
    if req.reasoning_tokens > 0 {
        output.push(reasoning_item(req));
    }
    let status = final_status(req);
    output.push(message_item(
        req,
        if status == "completed" {
            "completed"
        } else {
            "incomplete"
        },
        json!([text_part(&text)]),
    ));
    let output_tokens = n + req.reasoning_tokens;
    let usage = json!({
        "input_tokens": req.input_tokens,
        "input_tokens_details": {"cached_tokens": req.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": req.reasoning_tokens},
        "total_tokens": req.input_tokens + output_tokens,
    });
    envelope(req, status, Value::Array(output), usage)
}

/// One SSE event of a Responses stream.
fn sse_event(event: &Value) -> Bytes {
    let kind = event["type"].as_str().unwrap_or("");
    Bytes::from(format!("event: {kind}\ndata: {event}\n\n"))
}

fn stream(cfg: &AoaiConfig, req: &Request, done: &Value, reset: bool) -> Response {
    let pieces = events(cfg, req, done)
        .into_iter()
        .map(|(wait, event)| Piece {
            wait,
            bytes: sse_event(&event),
        })
        .collect();
    sse_response(pieces, reset)
}

/// The stream's events, each with the wait before it.
fn events(cfg: &AoaiConfig, req: &Request, done: &Value) -> Vec<(Duration, Value)> {
    let mut seq = 0u64;
    let mut out = Vec::new();
    let mut push = |wait: Duration, kind: &str, mut event: Value| {
        event["type"] = json!(kind);
        event["sequence_number"] = json!(seq);
        seq += 1;
        out.push((wait, event));
    };
    let first_status = if req.background {
        "queued"
    } else {
        "in_progress"
    };
    let snapshot = |status: &str| envelope(req, status, json!([]), Value::Null);
    push(
        Duration::ZERO,
        "response.created",
        json!({"response": snapshot(first_status)}),
    );
    push(
        Duration::ZERO,
        "response.in_progress",
        json!({"response": snapshot("in_progress")}),
    );
    let mut index = 0;
    if req.reasoning_tokens > 0 {
        let item = reasoning_item(req);
        push(
            Duration::ZERO,
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        push(
            Duration::ZERO,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        index += 1;
    }
    push(
        Duration::ZERO,
        "response.output_item.added",
        json!({"output_index": index, "item": message_item(req, "in_progress", json!([]))}),
    );
    let at = |extra: Value| {
        let mut v = json!({"item_id": req.msg_id, "output_index": index, "content_index": 0});
        if let (Some(v), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            v.extend(e.clone());
        }
        v
    };
    push(
        Duration::ZERO,
        "response.content_part.added",
        at(json!({"part": text_part("")})),
    );
    for (k, t) in req.choice.tokens.iter().enumerate() {
        let wait = if k == 0 {
            cfg.first_token
        } else {
            cfg.time_per_token
        };
        push(
            wait,
            "response.output_text.delta",
            at(json!({"delta": t, "logprobs": []})),
        );
    }
    let text = req.choice.tokens.concat();
    push(
        Duration::ZERO,
        "response.output_text.done",
        at(json!({"text": text, "logprobs": []})),
    );
    push(
        Duration::ZERO,
        "response.content_part.done",
        at(json!({"part": text_part(&text)})),
    );
    let item = done["output"][index].clone();
    push(
        Duration::ZERO,
        "response.output_item.done",
        json!({"output_index": index, "item": item}),
    );
    let last = if final_status(req) == "completed" {
        "response.completed"
    } else {
        "response.incomplete"
    };
    push(Duration::ZERO, last, json!({"response": done}));
    out
}

/// `GET`/`DELETE /responses/{id}`, `GET …/input_items`, `POST …/cancel`.
pub(super) fn item(
    sim: &AoaiSim,
    method: &Method,
    path: &str,
    query: &[(String, String)],
) -> Response {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (id, sub) = match segs.as_slice() {
        [.., "responses", id] => (*id, None),
        [.., "responses", id, sub] => (*id, Some(*sub)),
        _ => return not_found(),
    };
    let allowed = match sub {
        None => *method == Method::GET || *method == Method::DELETE,
        Some("input_items") => *method == Method::GET,
        Some(_) => *method == Method::POST,
    };
    if !allowed {
        return aoai_error(405, "MethodNotAllowed", "The HTTP method is not allowed.");
    }
    let now = Instant::now();
    let mut store = sim.responses.lock();
    if *method == Method::DELETE {
        if store.map.remove(id).is_none() {
            return not_found_response(id);
        }
        store.order.retain(|k| k != id);
        return json_response(
            200,
            &json!({"id": id, "object": "response.deleted", "deleted": true}),
        );
    }
    let Some(stored) = store.map.get_mut(id) else {
        return not_found_response(id);
    };
    match sub {
        None => {
            if query.iter().any(|(k, v)| k == "stream" && v == "true") {
                return replay(stored, now, query);
            }
            json_response(200, &stored.view(now))
        }
        Some("cancel") => {
            if !stored.background {
                return invalid_request(
                    "Only responses created with background=true can be cancelled.",
                    "response_id",
                );
            }
            if now < stored.ready_at {
                stored.cancelled = true;
            }
            json_response(200, &stored.view(now))
        }
        Some(_) => input_items(&stored.input_items, query),
    }
}

/// `GET /responses/{id}?stream=true[&starting_after=N]`: the stored stream's events after
/// sequence number `N` (all of them without it). A background response still running holds the
/// stream until it finishes; a cancelled one replays only its lifecycle start.
fn replay(stored: &Stored, now: Instant, query: &[(String, String)]) -> Response {
    let after = match query.iter().find(|(k, _)| k == "starting_after") {
        None => None,
        Some((_, v)) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return invalid_request(
                    "Invalid 'starting_after': expected an integer.",
                    "starting_after",
                )
            }
        },
    };
    let mut hold = stored.ready_at.saturating_duration_since(now);
    let pieces = stored
        .events
        .iter()
        .filter(|e| after.is_none_or(|n| e["sequence_number"].as_u64().is_some_and(|s| s > n)))
        .filter(|e| {
            !stored.cancelled
                || matches!(
                    e["type"].as_str(),
                    Some("response.created" | "response.in_progress")
                )
        })
        .map(|e| Piece {
            wait: if stored.cancelled {
                Duration::ZERO
            } else {
                std::mem::take(&mut hold)
            },
            bytes: sse_event(e),
        })
        .collect();
    sse_response(pieces, false)
}

fn input_items(items: &[Value], query: &[(String, String)]) -> Response {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let limit = match get("limit").map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => return invalid_request("Invalid 'limit': must be between 1 and 100.", "limit"),
    };
    let mut ordered: Vec<&Value> = items.iter().collect();
    match get("order") {
        None | Some("desc") => ordered.reverse(),
        Some("asc") => {}
        Some(_) => return invalid_request("Invalid 'order': expected 'asc' or 'desc'.", "order"),
    }
    if let Some(after) = get("after") {
        match ordered.iter().position(|v| v["id"] == after) {
            Some(p) => ordered.drain(..=p).for_each(drop),
            None => return invalid_request("Invalid 'after': no such item.", "after"),
        }
    }
    let has_more = ordered.len() > limit;
    ordered.truncate(limit);
    json_response(
        200,
        &json!({
            "object": "list",
            "data": ordered,
            "first_id": ordered.first().map(|v| v["id"].clone()),
            "last_id": ordered.last().map(|v| v["id"].clone()),
            "has_more": has_more,
        }),
    )
}
