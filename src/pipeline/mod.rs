//! The request path, one module per stage, in the order [`crate::app`] runs them:
//!
//! | stage | module | short-circuits with |
//! |---|---|---|
//! | route | [`route`] | 400 bad path or query, 404 unknown, 405 wrong method |
//! | auth | [`auth`] | 401 |
//! | policy | [`policy`] | 400 bad body or missing user, 403 unregistered user, 413 |
//! | batch (file upload) | [`batch`] | 400 a batch input line would be refused online |
//! | content safety | [`content_safety`] | 400 content filtered, 503 screening failed (fail closed), 413 too long to screen, 429 too many screened at once |
//! | audit | [`audit`] | 503 `audit_unavailable` when a refusal's record cannot be made durable; otherwise never: every refusal above is answered only once its record is durable |
//! | budget | [`budget`] | 429 over the caller's token budget (`CALLER_TOKEN_LIMITS`) |
//! | forward | [`forward`] | 413, 429 every AOAI resource cooling down, 502, 503 none usable, 504; a 429/5xx/failed resource is retried on the next of `AOAI_BACKUPS` before the first byte |
//! | meter | [`meter`] | never: a tap on the answer reads `usage` and settles the budget |
//!
//! Each stage's `//!` doc says when it runs, what it may short-circuit, and what it adds to the
//! per-request context ([`crate::app::RequestLog`]).

pub mod audit;
pub mod auth;
pub mod batch;
pub mod budget;
pub mod content_safety;
pub mod forward;
pub mod meter;
pub mod policy;
pub mod route;
