//! Helpers of the audit, identity and Key Vault tests: local stubs that speak the exact Azure
//! protocols, and the Cosmos DB SDK's in-memory emulator. Each test file takes the parts it
//! needs with `mod support;`.
#![allow(dead_code)]

#[allow(clippy::duplicate_mod)]
pub mod content_safety;
pub mod cosmos_emu;
pub mod keyvault_stub;
pub mod logs;
pub mod mi_stub;
