//! The integration tests of the handler, as one test binary.
//!
//! Each former `tests/<name>.rs` is a module here (`tests/it/<name>.rs`). One binary instead of
//! one per file: the shared modules (`tests/support`, `tests/common`) are compiled once and the
//! test harness is linked against the handler's library and the Azure SDK once, not eighteen
//! times, which was most of the suite's compile time (docs/benchmarks.md, "CI time").
//!
//! The tests share one process, so nothing here may rely on having the process to itself:
//! - environment variables: only [`support::mi_stub`] sets any (`IDENTITY_ENDPOINT` and
//!   `IDENTITY_HEADER`, once, before any credential reads them); a test that needs other values
//!   runs its body in a child process of this binary ([`support::child`]);
//! - log capture: one process-wide subscriber ([`support::logs::global`]) or a per-thread one
//!   ([`support::logs::capture`]), never a second `set_global_default`;
//! - the managed-identity stub counts token requests per client id: each test asks for its
//!   own id;
//! - ports: everything listens on port 0 and reads the port back.
//!
//! Adding a test file: see `tests/README.md`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../support/mod.rs"]
pub mod support;

mod api;
mod audit_cosmos;
mod audit_durability;
mod budget;
mod cs_answers;
mod docs;
mod edge;
mod gate;
mod gate_azure;
mod gate_extract;
mod identity_header;
mod identity_managed;
mod keyvault_secrets;
mod layout;
mod meter;
mod process;
mod routes;
mod settings;
mod spillover;
mod surface;
mod usage_cosmos;
