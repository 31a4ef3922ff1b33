//! The request path, one module per stage, in the order [`crate::app`] runs them:
//!
//! | stage | module | short-circuits with |
//! |---|---|---|
//! | route | [`route`] | 400 bad path or query, 404 unknown, 405 wrong method |
//! | auth | [`auth`] | 401 |
//! | forward | [`forward`] | 413, 502, 504 |
//!
//! Each stage's `//!` doc says when it runs, what it may short-circuit, and what it adds to the
//! per-request context ([`crate::app::RequestLog`]).

pub mod audit;
pub mod auth;
pub mod forward;
pub mod route;
