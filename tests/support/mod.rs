//! The one test-support module of the integration tests: the fake AOAI ([`aoai`]), the app
//! in-process and the settings merge ([`app`]), the real `handler` process on port 0
//! ([`handler`]), the bounded wait ([`wait`]), temporary files ([`scratch`]), local stubs that
//! speak the exact Azure protocols (managed identity, Key Vault) and the Cosmos DB SDK's
//! in-memory emulator, and a test body in its own child process ([`child`]). The test modules
//! of `tests/it` take it with `use crate::support;` (or through `use crate::common;`, which
//! re-exports it under the names the older tests use).
#![allow(dead_code)]

pub mod aoai;
pub mod app;
pub mod child;
pub mod content_safety;
pub mod cosmos_emu;
pub mod handler;
pub mod keyvault_stub;
pub mod logs;
pub mod mi_stub;
pub mod scratch;
pub mod wait;
