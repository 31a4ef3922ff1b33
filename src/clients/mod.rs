//! Clients of the services the handler talks to, each built once at startup and shared by every
//! request.
//!
//! - [`http`]: the one shared HTTPS client (rustls, pooled, no proxy, no redirects) that AOAI
//!   and Content Safety calls go through ([`http::https_client`]).
//! - [`identity`]: the managed identity (Functions `IDENTITY_ENDPOINT`/`IDENTITY_HEADER`), as
//!   an Entra token source with its own cache ([`identity::TokenSource`]) and as the
//!   `TokenCredential` the Azure SDK clients take.
//! - [`keyvault`]: secrets fetched from Key Vault at start, re-fetched on demand (AOAI answered
//!   401) and periodically ([`keyvault::VaultSecret`]).
//! - [`cosmos`]: the Cosmos DB account of the abuse log and the user registry
//!   ([`cosmos::CosmosAccount`]), connected lazily so a Cosmos outage at start never stops the
//!   handler.
//!
//! Nothing here prints a key or token: secrets travel as [`crate::settings::Secret`] or as
//! header values marked sensitive.

pub mod cosmos;
pub mod http;
pub mod identity;
pub mod keyvault;
