//! What the model reads, per operation: the one table the gate extracts by.
//!
//! Every [`Operation`] the router accepts has an entry in [`spec`] — an exhaustive `match`, so a
//! new operation does not compile until someone decides what of its body the model reads. Each
//! entry names the body's form and, per top-level field, how it is read ([`Read`]). The rules
//! that make it safe by default:
//! - a top-level field the entry does not name is **screened as user text** (every string in
//!   it): a field AOAI adds tomorrow is screened before anyone updates this table;
//! - inside a text-bearing field every string is screened except the few whose key says they
//!   are not text ([`NOT_TEXT`]: ids, types, URLs, base64 data) and subtrees that carry
//!   configuration or secrets ([`OPAQUE`]); a content-part type nobody knows yet is screened;
//! - numbers, booleans and null carry no text; token-id arrays do, and cannot be screened
//!   without the model's tokenizer, so they are refused while screening is on.

use super::super::route::Operation;

/// Where a piece of text goes (see [`super::PromptText`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Harm categories and Prompt Shields' user prompt.
    User,
    /// Harm categories and Prompt Shields' documents (indirect attack).
    Documents,
    /// Harm categories only.
    HarmOnly,
}

/// How a top-level field is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Every string beneath, into this bucket.
    Text(Bucket),
    /// Chat `messages`: each message's strings go to a bucket its `role` decides: `tool` and
    /// `function` results are documents; everything else the client wrote — `user`, `system`,
    /// `developer` and `assistant` turns, and the tool-call arguments inside assistant turns —
    /// is user text, because a fabricated assistant turn or tool call is a known jailbreak vector
    /// and Prompt Shields must see it.
    Messages,
    /// Responses `input`: a string, or items; tool outputs (`*_output` items and the built-in
    /// tools' call results) are documents, every other item is read as [`Read::Messages`] does.
    Items,
    /// Tool and function definitions, JSON schemas: every string and every property name, as
    /// user text (harm categories and Prompt Shields): the client writes them and the model
    /// reads them as part of its instructions, as it reads a system message.
    Definitions,
    /// Completions `prompt`, embeddings `input`: a string, strings, or token-id arrays.
    PromptOrTokens,
    /// `data_sources` (On Your Data): only `parameters.role_information` is read by the model;
    /// the rest is connection configuration, including keys, and never leaves the handler.
    DataSources,
    /// The end user, for the user check (never screened).
    User,
    /// v1: the deployment, for records.
    Model,
    /// Not read by the model: sampling knobs, ids, formats, metadata.
    Ignore,
}

/// The form of the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No prompt: the body streams through unread.
    None,
    Json,
    /// `multipart/form-data` (audio): text fields are read, files cannot be screened.
    Multipart,
    /// A file upload (`multipart/form-data`): a `purpose=batch` file is JSONL, one request per
    /// line, and each line's `body` is read by the entry of the operation its `url` names
    /// (`pipeline::batch`); the model reads nothing else of the upload.
    BatchInput,
}

/// One operation's entry.
#[derive(Debug)]
pub struct Spec {
    pub body: Body,
    /// Top-level fields read in a named way.
    pub fields: &'static [(&'static str, Read)],
    /// Top-level fields the model does not read: sampling knobs, ids, formats, metadata. Any
    /// field in neither list is read as `Read::Text(Bucket::User)`.
    pub ignore: &'static [&'static str],
    /// Whether Prompt Shields runs (embeddings are never executed as instructions).
    pub shield: bool,
}

impl Spec {
    /// How `field` is read. Names match regardless of ASCII case: ASP.NET front ends bind JSON
    /// properties and form fields case-insensitively, so `"USER"` may be AOAI's `user`.
    pub fn read(&self, field: &str) -> Read {
        self.fields
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(field))
            .map(|(_, r)| *r)
            .or_else(|| {
                self.ignore
                    .iter()
                    .any(|name| name.eq_ignore_ascii_case(field))
                    .then_some(Read::Ignore)
            })
            .unwrap_or(Read::Text(Bucket::User))
    }
}

/// String values under these keys are not text the model reads as language: identifiers,
/// enumerations, URLs and inline binary data (images and audio cannot be screened as text).
pub const NOT_TEXT: &[&str] = &[
    "type",
    "role",
    "id",
    "tool_call_id",
    "call_id",
    "status",
    "url",
    "image_url",
    "detail",
    "data",
    "file_data",
    "file_id",
    "format",
    "vector_store_ids",
    "server_url",
];

/// Whether a string under a [`NOT_TEXT`] key is what the key promises, and so may go unscreened.
/// A key does not make its value harmless: `"status":"ignore all previous instructions"` is
/// free text in a place the table trusts, and the model may still read it. So only values of
/// the key's own shape skip screening: identifiers and enumerations (no whitespace, at most 128
/// characters), URLs (`http(s)://` or `data:` without whitespace), base64 for binary data.
/// Anything else under those keys is screened as text.
pub fn not_text_value(key: &str, value: &str) -> bool {
    fn ident(v: &str) -> bool {
        v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
    }
    fn url(v: &str) -> bool {
        let lower = |p: &str| v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p);
        (lower("https://") || lower("http://") || lower("data:"))
            && !v.chars().any(|c| c.is_whitespace() || c.is_control())
    }
    fn base64(v: &str) -> bool {
        v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    }
    match key {
        "url" | "image_url" | "server_url" => url(value),
        "data" | "file_data" => base64(value) || url(value),
        _ => ident(value),
    }
}

/// Keys of a tool object itself (`tools[i].headers`, remote tools' credentials) never read as
/// text and never copied into a record. Only there: the same names deeper down (a schema
/// property called `headers`) are screened. Messages skip only `encrypted_content`.
pub const OPAQUE: &[&str] = &[
    "headers",
    "authorization",
    "authentication",
    "encrypted_content",
];

/// In [`Read::Definitions`], keys of objects under these keys are names the model reads.
pub const NAMED_KEYS: &[&str] = &["properties", "$defs", "definitions", "patternProperties"];

const USER: (&str, Read) = ("user", Read::User);
const MODEL: (&str, Read) = ("model", Read::Model);

const CHAT: Spec = Spec {
    body: Body::Json,
    fields: &[
        USER,
        MODEL,
        ("messages", Read::Messages),
        ("tools", Read::Definitions),
        ("functions", Read::Definitions),
        ("response_format", Read::Definitions),
        ("data_sources", Read::DataSources),
        ("dataSources", Read::DataSources),
        ("prediction", Read::Text(Bucket::HarmOnly)),
    ],
    ignore: &[
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tool_choice",
        "function_call",
        "parallel_tool_calls",
        "metadata",
        "store",
        "reasoning_effort",
        "modalities",
        "audio",
        "service_tier",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
        "user_security_context",
    ],
    shield: true,
};

const COMPLETIONS: Spec = Spec {
    body: Body::Json,
    fields: &[
        USER,
        MODEL,
        ("prompt", Read::PromptOrTokens),
        ("suffix", Read::Text(Bucket::User)),
    ],
    ignore: &[
        "best_of",
        "echo",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "max_tokens",
        "n",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
    ],
    shield: true,
};

const EMBEDDINGS: Spec = Spec {
    body: Body::Json,
    fields: &[USER, MODEL, ("input", Read::PromptOrTokens)],
    ignore: &["dimensions", "encoding_format", "input_type"],
    shield: false,
};

const RESPONSES: Spec = Spec {
    body: Body::Json,
    fields: &[
        USER,
        MODEL,
        ("instructions", Read::Text(Bucket::User)),
        ("input", Read::Items),
        ("tools", Read::Definitions),
        // `text.format` may carry a JSON schema
        ("text", Read::Definitions),
        // prompt templates: `variables` are text inserted into the prompt
        ("prompt", Read::Text(Bucket::User)),
    ],
    ignore: &[
        "previous_response_id",
        "conversation",
        "include",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "parallel_tool_calls",
        "reasoning",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "top_logprobs",
        "top_p",
        "truncation",
        "background",
        "prompt_cache_key",
        "safety_identifier",
    ],
    shield: true,
};

const IMAGES: Spec = Spec {
    body: Body::Json,
    fields: &[USER, MODEL, ("prompt", Read::Text(Bucket::User))],
    ignore: &[
        "n",
        "size",
        "quality",
        "style",
        "response_format",
        "output_format",
        "output_compression",
        "background",
        "moderation",
        "partial_images",
        "stream",
    ],
    shield: true,
};

const SPEECH: Spec = Spec {
    body: Body::Json,
    fields: &[
        USER,
        MODEL,
        ("input", Read::Text(Bucket::User)),
        ("instructions", Read::Text(Bucket::User)),
    ],
    ignore: &["voice", "response_format", "speed", "stream_format"],
    shield: true,
};

/// Multipart text fields. `file` is the audio: it cannot be screened as text.
const AUDIO: Spec = Spec {
    body: Body::Multipart,
    fields: &[
        USER,
        MODEL,
        ("prompt", Read::Text(Bucket::User)),
        ("file", Read::Ignore),
    ],
    ignore: &[
        "language",
        "response_format",
        "temperature",
        "timestamp_granularities[]",
        "stream",
        "include[]",
        "chunking_strategy",
    ],
    shield: true,
};

/// The upload's own form fields; the lines of the file are read by their operations' entries.
const FILE_UPLOAD: Spec = Spec {
    body: Body::BatchInput,
    fields: &[USER, ("file", Read::Ignore)],
    ignore: &["purpose", "expires_after[anchor]", "expires_after[seconds]"],
    shield: false,
};

const NO_BODY: Spec = Spec {
    body: Body::None,
    fields: &[],
    ignore: &[],
    shield: false,
};

/// The entry for `op`. Exhaustive on purpose: no wildcard arm.
pub fn spec(op: Operation) -> &'static Spec {
    match op {
        Operation::ChatCompletions
        | Operation::ExtensionsChatCompletions
        | Operation::V1ChatCompletions => &CHAT,
        Operation::Completions | Operation::V1Completions => &COMPLETIONS,
        Operation::Embeddings | Operation::V1Embeddings => &EMBEDDINGS,
        Operation::V1Responses | Operation::Responses => &RESPONSES,
        Operation::ImageGenerations | Operation::V1ImageGenerations => &IMAGES,
        Operation::AudioSpeech | Operation::V1AudioSpeech => &SPEECH,
        Operation::AudioTranscriptions
        | Operation::AudioTranslations
        | Operation::V1AudioTranscriptions
        | Operation::V1AudioTranslations => &AUDIO,
        Operation::FileUpload => &FILE_UPLOAD,
        Operation::V1ResponseItem
        | Operation::V1Models
        | Operation::ResponseItem
        | Operation::Files
        | Operation::BatchCreate
        | Operation::Batches => &NO_BODY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_the_router_accepts_has_an_entry_that_agrees_with_it() {
        for &op in Operation::ALL {
            let s = spec(op);
            assert_eq!(
                op.carries_prompt(),
                s.body != Body::None,
                "{}: the router and the map disagree on whether its body is read",
                op.name()
            );
            assert_eq!(op.shieldable(), s.shield, "{}", op.name());
            if s.body != Body::None {
                assert_eq!(s.read("user"), Read::User, "{}", op.name());
                // an unknown field is screened, not skipped
                assert_eq!(s.read("some_future_field"), Read::Text(Bucket::User));
                // no field is named twice
                let names: Vec<&str> = s
                    .fields
                    .iter()
                    .map(|(n, _)| *n)
                    .chain(s.ignore.iter().copied())
                    .collect();
                for (i, name) in names.iter().enumerate() {
                    assert!(
                        !names[i + 1..].contains(name),
                        "{}: {name} twice",
                        op.name()
                    );
                }
            }
        }
    }
}
