//! Stage 2, **auth**: runs after routing, for every route except the health check (the only
//! open route: deny by default).
//!
//! Reads the internal key from `api-key` or `Authorization: Bearer` and finds which caller it
//! belongs to. Short-circuits with 401; the upstream never sees an unauthenticated request. Adds
//! the caller's name to the request context.
//!
//! Comparison is constant-time: the presented key and every configured key are hashed to
//! SHA-256 digests (so lengths do not leak) and every digest is compared with `subtle`, without
//! an early exit on the first match.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::error::AppError;
use crate::settings::CallerKey;

/// The configured callers, with their keys pre-hashed once at startup.
pub struct Authenticator {
    callers: Vec<(String, [u8; 32])>,
}

impl Authenticator {
    pub fn new(callers: &[CallerKey]) -> Self {
        Authenticator {
            callers: callers
                .iter()
                .map(|c| (c.name.clone(), digest(c.key.expose().as_bytes())))
                .collect(),
        }
    }

    /// The name of the caller whose key the request presents.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&str, AppError> {
        let presented = presented_key(headers).ok_or(AppError::Unauthorized)?;
        let presented = digest(presented);
        // Walk every caller whatever matches, selecting the index in constant time.
        let mut found = 0u32; // index + 1; 0 = none
        for (i, (_, key)) in self.callers.iter().enumerate() {
            let hit = key.ct_eq(&presented);
            found = u32::conditional_select(&found, &(i as u32 + 1), hit);
        }
        match found {
            0 => Err(AppError::Unauthorized),
            n => Ok(&self.callers[n as usize - 1].0),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `api-key` as a ready name (a `&str` name is parsed and checked on every lookup).
const API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");

/// `api-key` wins when both are present (AOAI's own precedence for key auth).
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(API_KEY) {
        let v = v.as_bytes().trim_ascii();
        return (!v.is_empty()).then_some(v);
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = auth.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    fn auth() -> Authenticator {
        Authenticator::new(&[
            CallerKey {
                name: "a".into(),
                key: Secret::new("key-aaaaaaaaaaaaaaaa"),
            },
            CallerKey {
                name: "b".into(),
                key: Secret::new("key-bbbbbbbbbbbbbbbb"),
            },
        ])
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn finds_the_caller() {
        let a = auth();
        assert_eq!(
            a.authenticate(&headers(&[("api-key", "key-bbbbbbbbbbbbbbbb")]))
                .unwrap(),
            "b"
        );
        assert_eq!(
            a.authenticate(&headers(&[(
                "authorization",
                "Bearer key-aaaaaaaaaaaaaaaa"
            )]))
            .unwrap(),
            "a"
        );
        assert_eq!(
            a.authenticate(&headers(&[(
                "authorization",
                "bearer key-aaaaaaaaaaaaaaaa"
            )]))
            .unwrap(),
            "a"
        );
    }

    #[test]
    fn rejects_missing_wrong_and_malformed() {
        let a = auth();
        for h in [
            headers(&[]),
            headers(&[("api-key", "")]),
            headers(&[("api-key", "key-aaaaaaaaaaaaaaa")]),
            headers(&[("api-key", "key-aaaaaaaaaaaaaaaax")]),
            headers(&[("authorization", "Basic key-aaaaaaaaaaaaaaaa")]),
            headers(&[("authorization", "Bearer")]),
            // a wrong api-key is not rescued by a right bearer token
            headers(&[
                ("api-key", "nope"),
                ("authorization", "Bearer key-aaaaaaaaaaaaaaaa"),
            ]),
        ] {
            assert!(a.authenticate(&h).is_err(), "{h:?}");
        }
    }
}
