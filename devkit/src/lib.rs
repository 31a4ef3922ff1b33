//! Local tooling for aoai-fwdproxy. Nothing in this crate is linked into the deployed `handler`.
//!
//! # Layout
//! - [`appgw`]: Application Gateway rewrite-rule evaluator (the same `infra/` JSON AppGW loads).
//! - [`gateway`]: Application Gateway emulator: rewrite rules, health probe, round-robin, 502.
//! - [`sim`]: simulators of Azure OpenAI ([`sim::aoai`]) and Content Safety
//!   ([`sim::content_safety`]), with a plausible tokenizer ([`sim::tokens`]).
//! - [`launcher`]: `fwdproxy-dev`, the whole set on loopback in one command.
//! - [`load`]: `fwdproxy-load`, steady chat load against the set and the spillover benchmark's
//!   figures.
//! - [`procs`]: the launcher's child processes, which never outlive it.
//! - [`server`]: the loopback server loop every piece above shares.
pub mod appgw;
pub mod gateway;
pub mod launcher;
pub mod load;
pub mod procs;
pub mod server;
pub mod sim;
