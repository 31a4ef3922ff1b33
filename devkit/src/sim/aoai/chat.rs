//! Chat and legacy completions: what to answer (a deterministic text cut into the tokenizer's
//! tokens), the JSON answers and the SSE streams with AOAI's framing (a first event with only
//! `prompt_filter_results`, a role chunk, one chunk per token, a finish chunk, the
//! `include_usage` chunk with `choices: []`, `data: [DONE]`). Also the [`Plan`] every operation
//! makes before the quota is charged.

use super::*;

// ---------------------------------------------------------------------------------------------
// Plans: what to answer, computed before the quota is charged.

/// Makes an answer: given the simulator and whether to cut the body (`reset`).
pub(super) type Respond = Box<dyn FnOnce(&AoaiSim, bool) -> Response + Send>;

pub(super) struct Choice {
    pub(super) tokens: Vec<String>,
    pub(super) finish_reason: &'static str,
}

pub(super) enum Plan {
    Chat {
        deployment: String,
        prompt_tokens: usize,
        choices: Vec<Choice>,
        stream: bool,
        include_usage: bool,
        extensions: bool,
    },
    Completions {
        deployment: String,
        prompt_tokens: usize,
        choices: Vec<Choice>,
        stream: bool,
        include_usage: bool,
    },
    Embeddings {
        body: Value,
        prompt_tokens: usize,
    },
    /// Any other answer: its token cost, and how to make it (`reset` cuts the body).
    Custom {
        tokens: usize,
        respond: Respond,
    },
}

impl Plan {
    pub(super) fn total_tokens(&self) -> usize {
        match self {
            Plan::Chat {
                prompt_tokens,
                choices,
                ..
            }
            | Plan::Completions {
                prompt_tokens,
                choices,
                ..
            } => prompt_tokens + choices.iter().map(|c| c.tokens.len()).sum::<usize>(),
            Plan::Embeddings { prompt_tokens, .. } => *prompt_tokens,
            Plan::Custom { tokens, .. } => *tokens,
        }
    }

    pub(super) fn into_response(self, sim: &AoaiSim, reset: bool) -> Response {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cfg = &sim.config;
        match self {
            Plan::Chat {
                deployment,
                prompt_tokens,
                choices,
                stream,
                include_usage,
                extensions,
            } => {
                let id = format!("chatcmpl-{}", &sim.new_id().replace('-', "")[..24]);
                let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
                let usage = usage(prompt_tokens, completion);
                if stream {
                    return chat_stream(
                        cfg,
                        ChatStream {
                            id,
                            created,
                            model: deployment,
                            choices,
                            usage: include_usage.then_some(usage),
                            extensions,
                        },
                        reset,
                    );
                }
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": deployment,
                    "system_fingerprint": "fp_sim",
                    "prompt_filter_results": [prompt_filter_results()],
                    "choices": choices.iter().enumerate().map(|(i, c)| {
                        let mut message = json!({"role": "assistant", "content": c.tokens.concat(), "refusal": null});
                        if extensions {
                            message["context"] = extension_context();
                        }
                        json!({"index": i, "finish_reason": c.finish_reason, "logprobs": null,
                               "message": message, "content_filter_results": content_filter_results()})
                    }).collect::<Vec<_>>(),
                    "usage": usage,
                });
                delayed_json(cfg, completion, body, reset)
            }
            Plan::Completions {
                deployment,
                prompt_tokens,
                choices,
                stream,
                include_usage,
            } => {
                let id = format!("cmpl-{}", &sim.new_id().replace('-', "")[..24]);
                let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
                let usage = usage(prompt_tokens, completion);
                if stream {
                    return completions_stream(
                        cfg,
                        id,
                        created,
                        deployment,
                        choices,
                        include_usage.then_some(usage),
                        reset,
                    );
                }
                let body = json!({
                    "id": id,
                    "object": "text_completion",
                    "created": created,
                    "model": deployment,
                    "prompt_filter_results": [prompt_filter_results()],
                    "choices": choices.iter().enumerate().map(|(i, c)| json!({
                        "text": c.tokens.concat(), "index": i, "finish_reason": c.finish_reason,
                        "logprobs": null, "content_filter_results": content_filter_results()
                    })).collect::<Vec<_>>(),
                    "usage": usage,
                });
                delayed_json(cfg, completion, body, reset)
            }
            Plan::Embeddings { body, .. } => delayed_json(cfg, 0, body, reset),
            Plan::Custom { respond, .. } => respond(sim, reset),
        }
    }
}

pub(super) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

pub(super) fn safe() -> Value {
    json!({"filtered": false, "severity": "safe"})
}

pub(super) fn prompt_filter_results() -> Value {
    json!({"prompt_index": 0, "content_filter_results": {
        "hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe(),
        "jailbreak": {"filtered": false, "detected": false}
    }})
}

pub(super) fn content_filter_results() -> Value {
    json!({"hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe(),
           "protected_material_code": {"filtered": false, "detected": false},
           "protected_material_text": {"filtered": false, "detected": false}})
}

pub(super) fn extension_context() -> Value {
    json!({"citations": [{"content": "Simulated retrieved document.", "title": "sim-doc-1",
                          "url": null, "filepath": "sim-doc-1.md", "chunk_id": "0"}],
           "intent": "[\"simulated search intent\"]"})
}

/// Text of a chat message's `content`: a string, or the `text` of its text parts.
pub(super) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// `max_tokens`, or the newer `max_completion_tokens` / `max_output_tokens`.
pub(super) fn max_tokens(body: &Value) -> Result<Option<usize>, Reject> {
    for name in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        match body.get(name) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some((n as usize).min(MAX_COMPLETION_TOKENS))),
                    _ => Err(invalid_request(
                        &format!(
                            "Invalid '{name}': integer below minimum value. Expected a value >= 1."
                        ),
                        name,
                    )),
                };
            }
        }
    }
    Ok(None)
}

pub(super) fn choices_n(body: &Value) -> Result<usize, Reject> {
    match body.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => Ok(n as usize),
            _ => Err(invalid_request(
                &format!("Invalid 'n': must be between 1 and {MAX_CHOICES}."),
                "n",
            )),
        },
    }
}

pub(super) fn stream_flags(body: &Value) -> (bool, bool) {
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    (stream, include_usage)
}

/// Filler sentences for answers; chosen by the prompt's hash so answers are stable.
pub(super) const FILLER: &[&str] = &[
    "The request went through the gateway, the handler and the simulated resource.",
    "Nothing here came from a real model; the words are chosen to look like an answer.",
    "Token counts in the usage block match the number of tokens in this text.",
    "Streaming sends one token per event, with a configurable delay between tokens.",
    "Rate limits, failures and slow answers can be injected with flags or headers.",
    "Each backend talks to its own simulated resource, as one Function App per resource.",
];

/// The answer to `prompt`, as tokens, cut at `max` tokens.
pub(super) fn answer(
    sim: &AoaiSim,
    deployment: &str,
    prompt: &str,
    index: usize,
    max: Option<usize>,
) -> Choice {
    let text = match prompt.trim_start().strip_prefix("echo:") {
        Some(rest) => rest.trim_start().to_string(),
        None => {
            let h = stable_hash(&[
                prompt.as_bytes(),
                deployment.as_bytes(),
                &index.to_le_bytes(),
            ]);
            let words: Vec<&str> = prompt.split_whitespace().take(6).collect();
            let mut text = format!(
                "Simulated answer from {} ({deployment}) to \"{}{}\".",
                sim.config.name,
                words.join(" "),
                if prompt.split_whitespace().count() > 6 {
                    " …"
                } else {
                    ""
                }
            );
            let sentences = 1 + (h % 3) as usize;
            for i in 0..sentences {
                text.push(' ');
                text.push_str(FILLER[(h as usize / 3 + i) % FILLER.len()]);
            }
            text
        }
    };
    let all: Vec<String> = tokens::tokenize(&text)
        .into_iter()
        .map(str::to_string)
        .collect();
    let limit = max
        .unwrap_or(MAX_COMPLETION_TOKENS)
        .min(MAX_COMPLETION_TOKENS);
    if all.len() > limit {
        Choice {
            tokens: all.into_iter().take(limit).collect(),
            finish_reason: "length",
        }
    } else {
        Choice {
            tokens: all,
            finish_reason: "stop",
        }
    }
}

pub(super) fn plan_chat(
    sim: &AoaiSim,
    at: &Deployed<'_>,
    body: &Value,
    extensions: bool,
) -> Result<Plan, Reject> {
    if !matches!(at.kind, ModelKind::Chat { .. }) {
        return Err(operation_not_supported("chatCompletion", at.model));
    }
    let deployment = at.deployment;
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid_request("[] is too short - 'messages'", "messages"))
        }
        _ => {
            return Err(invalid_request(
                "'messages' is a required property",
                "messages",
            ))
        }
    };
    // OpenAI's accounting: 3 tokens per message, the role and content, 1 per name, 3 to prime.
    let mut prompt_tokens = 3;
    let mut last_user = String::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if role.is_empty() {
            return Err(invalid_request(
                "'role' is a required property - 'messages.0'",
                "messages",
            ));
        }
        let text = content_text(m.get("content").unwrap_or(&Value::Null));
        prompt_tokens += 3 + tokens::count(role) + tokens::count(&text);
        if let Some(name) = m.get("name").and_then(Value::as_str) {
            prompt_tokens += 1 + tokens::count(name);
        }
        if role == "user" {
            last_user = text;
        }
    }
    let max = max_tokens(body)?;
    let n = choices_n(body)?;
    let (stream, include_usage) = stream_flags(body);
    Ok(Plan::Chat {
        deployment: at.model.to_string(),
        prompt_tokens,
        choices: (0..n)
            .map(|i| answer(sim, deployment, &last_user, i, max))
            .collect(),
        stream,
        include_usage,
        extensions,
    })
}

pub(super) fn plan_completions(
    sim: &AoaiSim,
    at: &Deployed<'_>,
    body: &Value,
) -> Result<Plan, Reject> {
    if at.kind != ModelKind::Completion {
        return Err(operation_not_supported("completion", at.model));
    }
    let deployment = at.deployment;
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) && !items.is_empty() => {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        }
        None | Some(Value::Null) => vec!["<|endoftext|>".to_string()],
        _ => {
            return Err(invalid_request(
                "Invalid 'prompt': expected a string or an array of strings.",
                "prompt",
            ))
        }
    };
    if prompts.len() > MAX_CHOICES {
        return Err(invalid_request(
            "Too many prompts for the simulator (at most 10).",
            "prompt",
        ));
    }
    let max = max_tokens(body)?.or(Some(16)); // the completions API defaults to 16 tokens
    let n = choices_n(body)?;
    let (stream, include_usage) = stream_flags(body);
    let prompt_tokens = prompts.iter().map(|p| tokens::count(p)).sum();
    let mut choices = Vec::new();
    for p in &prompts {
        for i in 0..n {
            choices.push(answer(sim, deployment, p, i, max));
        }
    }
    Ok(Plan::Completions {
        deployment: at.model.to_string(),
        prompt_tokens,
        choices,
        stream,
        include_usage,
    })
}

pub(super) struct ChatStream {
    id: String,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Option<Value>,
    extensions: bool,
}

pub(super) fn chat_stream(cfg: &AoaiConfig, s: ChatStream, reset: bool) -> Response {
    let with_usage = s.usage.is_some();
    let chunk = |choices: Value| {
        let mut v = json!({"id": s.id, "object": "chat.completion.chunk", "created": s.created,
                           "model": s.model, "system_fingerprint": "fp_sim", "choices": choices});
        if with_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut pieces = vec![Piece {
        wait: Duration::ZERO,
        bytes: sse(
            &json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                           "prompt_filter_results": [prompt_filter_results()]}),
        ),
    }];
    for (i, c) in s.choices.iter().enumerate() {
        let mut delta = json!({"role": "assistant", "content": "", "refusal": null});
        if s.extensions {
            delta["context"] = extension_context();
        }
        pieces.push(Piece {
            wait: if i == 0 {
                cfg.first_token
            } else {
                Duration::ZERO
            },
            bytes: sse(&chunk(
                json!([{"index": i, "delta": delta, "finish_reason": null,
                                       "logprobs": null, "content_filter_results": {}}]),
            )),
        });
        for t in &c.tokens {
            pieces.push(Piece {
                wait: cfg.time_per_token,
                bytes: sse(&chunk(json!([{"index": i, "delta": {"content": t},
                    "finish_reason": null, "logprobs": null,
                    "content_filter_results": content_filter_results()}]))),
            });
        }
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&chunk(
                json!([{"index": i, "delta": {}, "finish_reason": c.finish_reason,
                                       "logprobs": null, "content_filter_results": {}}]),
            )),
        });
    }
    if let Some(usage) = s.usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&last),
        });
    }
    pieces.push(Piece {
        wait: Duration::ZERO,
        bytes: Bytes::from_static(b"data: [DONE]\n\n"),
    });
    sse_response(pieces, reset)
}

pub(super) fn completions_stream(
    cfg: &AoaiConfig,
    id: String,
    created: u64,
    model: String,
    choices: Vec<Choice>,
    usage: Option<Value>,
    reset: bool,
) -> Response {
    let with_usage = usage.is_some();
    let chunk = |choices: Value| {
        let mut v = json!({"id": id, "object": "text_completion", "created": created,
                           "model": model, "choices": choices});
        if with_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut pieces = vec![Piece {
        wait: Duration::ZERO,
        bytes: sse(
            &json!({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                           "prompt_filter_results": [prompt_filter_results()]}),
        ),
    }];
    for (i, c) in choices.iter().enumerate() {
        for (k, t) in c.tokens.iter().enumerate() {
            pieces.push(Piece {
                wait: if i == 0 && k == 0 {
                    cfg.first_token
                } else {
                    cfg.time_per_token
                },
                bytes: sse(&chunk(
                    json!([{"text": t, "index": i, "finish_reason": null,
                    "logprobs": null, "content_filter_results": content_filter_results()}]),
                )),
            });
        }
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&chunk(
                json!([{"text": "", "index": i, "finish_reason": c.finish_reason,
                                       "logprobs": null}]),
            )),
        });
    }
    if let Some(usage) = usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        pieces.push(Piece {
            wait: Duration::ZERO,
            bytes: sse(&last),
        });
    }
    pieces.push(Piece {
        wait: Duration::ZERO,
        bytes: Bytes::from_static(b"data: [DONE]\n\n"),
    });
    sse_response(pieces, reset)
}
