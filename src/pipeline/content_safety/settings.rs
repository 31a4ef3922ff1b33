//! `CONTENT_SAFETY_*` settings, checked at start.
//!
//! Every value is read and checked even when `CONTENT_SAFETY_ENDPOINT` is unset, so a typo such
//! as `CONTENT_SAFETY_FAIL_OPEN=ture` stops the start with a message naming the setting instead
//! of being ignored until the day screening is turned on.

use std::time::Duration;

use crate::settings::{parse_base_url, Secret, SettingsError, Source};

/// Default for `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST`: about 475,000 characters of harm
/// screening alone, or half that with Prompt Shields (each call carries up to 10,000 UTF-16
/// units less the overlap). A resource serves 1,000 calls per 10 s per API, so one request
/// can take at most a tenth of a second of the whole resource's quota.
pub const DEFAULT_MAX_CALLS: u32 = 100;
/// Upper bound of `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST`: one request taking a whole second of
/// the resource's quota is already more than any caller should get.
pub const MAX_CALLS_LIMIT: u32 = 1_000;
/// Default for `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS` (per process). Each screened request
/// makes at least two calls of typically 50–300 ms, so 64 in flight is about the ~100 calls/s
/// one resource serves per API: beyond it the service would answer 429 for everyone anyway.
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;
/// Upper bound of `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS`.
pub const MAX_CONCURRENT_LIMIT: u32 = 100_000;

const THRESHOLDS: [&str; 4] = [
    "CONTENT_SAFETY_THRESHOLD_HATE",
    "CONTENT_SAFETY_THRESHOLD_SELFHARM",
    "CONTENT_SAFETY_THRESHOLD_SEXUAL",
    "CONTENT_SAFETY_THRESHOLD_VIOLENCE",
];

/// Content Safety settings.
#[derive(Debug, Clone)]
pub struct ContentSafetySettings {
    /// `CONTENT_SAFETY_ENDPOINT`.
    pub endpoint: url::Url,
    /// `CONTENT_SAFETY_KEY`; without it, a managed-identity token.
    pub key: Option<Secret>,
    /// `CONTENT_SAFETY_THRESHOLD_{HATE,SELFHARM,SEXUAL,VIOLENCE}`: block at or above (1–7).
    pub thresholds: [u8; 4],
    /// `CONTENT_SAFETY_BLOCKLISTS`: blocklist names, comma-separated.
    pub blocklists: Vec<String>,
    /// `CONTENT_SAFETY_PROMPT_SHIELDS`: run `text:shieldPrompt` (default true).
    pub shields: bool,
    /// `CONTENT_SAFETY_FAIL_OPEN`: let requests through when screening is unavailable.
    pub fail_open: bool,
    /// `CONTENT_SAFETY_TIMEOUT_MS`: per call.
    pub timeout: Duration,
    /// `CONTENT_SAFETY_MAX_CALLS_PER_REQUEST`: more calls than this → 413, unscreened.
    pub max_calls: u32,
    /// `CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS`: requests screened at once in this process;
    /// past it → 429 with retry-after.
    pub max_concurrent: u32,
}

impl ContentSafetySettings {
    /// `None` when `CONTENT_SAFETY_ENDPOINT` is unset (screening off); every other
    /// `CONTENT_SAFETY_*` value is checked either way.
    pub fn from_source(src: &Source) -> Result<Option<Self>, SettingsError> {
        let mut thresholds = [4u8; 4];
        for (t, name) in thresholds.iter_mut().zip(THRESHOLDS) {
            *t = src.number(name, 4u8).map_err(|_| {
                SettingsError::new(name, "must be a whole number 1-7 (2 low, 4 medium, 6 high)")
            })?;
            if !(1..=7).contains(t) {
                return Err(SettingsError::new(
                    name,
                    "must be 1-7 (2 low, 4 medium, 6 high)",
                ));
            }
        }
        let blocklists: Vec<String> = src
            .get("CONTENT_SAFETY_BLOCKLISTS")?
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = blocklists.iter().find(|b| !blocklist_name_ok(b)) {
            return Err(SettingsError::new(
                "CONTENT_SAFETY_BLOCKLISTS",
                format!("blocklist name {bad:?} must be 1-64 of A-Z a-z 0-9 - _ ~ ."),
            ));
        }
        let timeout = Duration::from_millis(src.number("CONTENT_SAFETY_TIMEOUT_MS", 10_000u64)?);
        if timeout.is_zero() || timeout > crate::settings::FRONT_END_LIMIT {
            return Err(SettingsError::new(
                "CONTENT_SAFETY_TIMEOUT_MS",
                "must be above 0 and not above 230000 (the Azure front end ends calls at 230 s)",
            ));
        }
        let max_calls = bounded(
            src,
            "CONTENT_SAFETY_MAX_CALLS_PER_REQUEST",
            DEFAULT_MAX_CALLS,
            MAX_CALLS_LIMIT,
        )?;
        let max_concurrent = bounded(
            src,
            "CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS",
            DEFAULT_MAX_CONCURRENT,
            MAX_CONCURRENT_LIMIT,
        )?;
        let shields = src.flag("CONTENT_SAFETY_PROMPT_SHIELDS", true)?;
        let fail_open = src.flag("CONTENT_SAFETY_FAIL_OPEN", false)?;
        let key = src.get("CONTENT_SAFETY_KEY")?.map(Secret::new);

        let Some(endpoint) = src.get("CONTENT_SAFETY_ENDPOINT")? else {
            return Ok(None);
        };
        let endpoint = parse_base_url("CONTENT_SAFETY_ENDPOINT", endpoint)?;
        Ok(Some(ContentSafetySettings {
            endpoint,
            key,
            thresholds,
            blocklists,
            shields,
            fail_open,
            timeout,
            max_calls,
            max_concurrent,
        }))
    }
}

/// A whole number in `1..=max`, `default` when unset.
fn bounded(src: &Source, name: &'static str, default: u32, max: u32) -> Result<u32, SettingsError> {
    let problem = || format!("must be a whole number from 1 to {max}");
    let n = src
        .number(name, default)
        .map_err(|_| SettingsError::new(name, problem()))?;
    if n == 0 || n > max {
        return Err(SettingsError::new(name, problem()));
    }
    Ok(n)
}

/// Blocklist names as the service allows them in a URL path segment.
fn blocklist_name_ok(name: &str) -> bool {
    name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_~.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        pairs: &[(&'static str, &'static str)],
    ) -> Result<Option<ContentSafetySettings>, SettingsError> {
        let mut all = vec![(
            "CONTENT_SAFETY_ENDPOINT",
            "https://cs.cognitiveservices.azure.com",
        )];
        for (k, v) in pairs {
            all.retain(|(n, _)| n != k);
            all.push((k, v));
        }
        ContentSafetySettings::from_source(&Source::from_map(all))
    }

    #[test]
    fn defaults() {
        let s = parse(&[]).unwrap().unwrap();
        assert_eq!(s.thresholds, [4; 4]);
        assert!(s.shields && !s.fail_open);
        assert_eq!(s.max_calls, DEFAULT_MAX_CALLS);
        assert_eq!(s.max_concurrent, DEFAULT_MAX_CONCURRENT);
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert!(parse(&[("CONTENT_SAFETY_ENDPOINT", "")]).unwrap().is_none());
    }

    /// Every bad value stops the start naming its setting, with screening on or off.
    #[test]
    fn bad_values_name_their_setting() {
        let cases: &[(&'static str, &'static str)] = &[
            ("CONTENT_SAFETY_FAIL_OPEN", "ture"),
            ("CONTENT_SAFETY_FAIL_OPEN", "maybe"),
            ("CONTENT_SAFETY_FAIL_OPEN", "2"),
            ("CONTENT_SAFETY_PROMPT_SHIELDS", "flase"),
            ("CONTENT_SAFETY_PROMPT_SHIELDS", "enabled"),
            ("CONTENT_SAFETY_THRESHOLD_HATE", "0"),
            ("CONTENT_SAFETY_THRESHOLD_HATE", "8"),
            ("CONTENT_SAFETY_THRESHOLD_SELFHARM", "-1"),
            ("CONTENT_SAFETY_THRESHOLD_SEXUAL", "medium"),
            ("CONTENT_SAFETY_THRESHOLD_VIOLENCE", "4.5"),
            ("CONTENT_SAFETY_THRESHOLD_VIOLENCE", "300"),
            ("CONTENT_SAFETY_TIMEOUT_MS", "0"),
            ("CONTENT_SAFETY_TIMEOUT_MS", "230001"),
            ("CONTENT_SAFETY_TIMEOUT_MS", "10s"),
            ("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "0"),
            ("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "1001"),
            ("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "many"),
            ("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "0"),
            ("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "100001"),
            ("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "-5"),
            ("CONTENT_SAFETY_BLOCKLISTS", "ok, bad name"),
            ("CONTENT_SAFETY_BLOCKLISTS", "a/b"),
        ];
        for (name, value) in cases {
            for endpoint in ["https://cs.cognitiveservices.azure.com", ""] {
                let e = parse(&[(name, value), ("CONTENT_SAFETY_ENDPOINT", endpoint)])
                    .expect_err(&format!("{name}={value} accepted (endpoint {endpoint:?})"));
                assert_eq!(e.name, *name, "{name}={value}");
            }
        }
        for (name, value) in [
            (
                "CONTENT_SAFETY_ENDPOINT",
                "http://cs.cognitiveservices.azure.com",
            ),
            ("CONTENT_SAFETY_ENDPOINT", "ftp://cs"),
            (
                "CONTENT_SAFETY_ENDPOINT",
                "https://cs.example/contentsafety",
            ),
        ] {
            assert_eq!(parse(&[(name, value)]).unwrap_err().name, name);
        }
    }

    #[test]
    fn good_values_parse() {
        let s = parse(&[
            ("CONTENT_SAFETY_FAIL_OPEN", "TRUE"),
            ("CONTENT_SAFETY_PROMPT_SHIELDS", "off"),
            ("CONTENT_SAFETY_THRESHOLD_HATE", "1"),
            ("CONTENT_SAFETY_THRESHOLD_VIOLENCE", "7"),
            ("CONTENT_SAFETY_MAX_CALLS_PER_REQUEST", "1000"),
            ("CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS", "1"),
            ("CONTENT_SAFETY_BLOCKLISTS", " a-1, b_2 ,,"),
            ("CONTENT_SAFETY_ENDPOINT", "http://127.0.0.1:9"),
        ])
        .unwrap()
        .unwrap();
        assert!(s.fail_open && !s.shields);
        assert_eq!(s.thresholds, [1, 4, 4, 7]);
        assert_eq!((s.max_calls, s.max_concurrent), (1000, 1));
        assert_eq!(s.blocklists, ["a-1", "b_2"]);
    }
}
