//! aoai-fwdproxy: an Azure Functions custom handler that authenticates callers with internal keys,
//! and forwards their Azure OpenAI (AOAI) requests to the real AOAI resource with the real key,
//! streaming both ways.
//!
//! # Layout
//! - [`settings`]: typed settings, parsed once at startup; [`settings::Secret`] never prints.
//! - [`error`]: the one error type and its AOAI-shaped response.
//! - [`clients`]: clients built once: the shared HTTPS client, managed identity, Key Vault,
//!   Cosmos DB.
//! - [`app`]: shared state, the layer order of the request path, the server loop.
//! - [`pipeline`]: one module per stage of the request path (route, auth, policy, batch uploads,
//!   content safety, audit, budget, forward with its pool of AOAI resources, meter).
//! - [`telemetry`]: JSON log lines on stdout.
//!
//! `src/main.rs` is the deployed `handler` binary; local tooling (simulators, the gateway
//! emulator, the `fwdproxy-dev` launcher) lives in the `devkit` workspace member, never here.

pub mod app;
pub mod clients;
pub mod error;
pub mod pipeline;
pub mod settings;
pub mod telemetry;
