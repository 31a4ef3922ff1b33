//! Local tooling for aoai-fwdproxy. Nothing in this crate is linked into the deployed `handler`.
//!
//! # Layout
//! - [`appgw`]: Application Gateway rewrite-rule evaluator (the same `infra/` JSON AppGW loads).
pub mod appgw;
