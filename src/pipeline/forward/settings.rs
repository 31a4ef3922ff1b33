//! Spillover settings: the backup AOAI resources, how the handler authenticates to them, and the
//! pool's timing knobs. Parsed once with the rest of [`crate::settings::Settings`].

use std::time::Duration;

use url::Url;

use super::pool::Tuning;
use crate::clients::keyvault::SecretUri;
use crate::settings::{parse_base_url, AoaiAuth, Secret, SettingsError, Source};

/// `AOAI_BACKUPS` and what goes with it.
#[derive(Debug, Clone, Default)]
pub struct SpilloverSettings {
    /// `AOAI_BACKUPS`, in order (empty: no spillover).
    pub backups: Vec<Url>,
    /// `AOAI_BACKUP_OUTAPIKEYS`: one key per backup, in order (`AOAI_AUTH=key`).
    pub backup_keys: Vec<Secret>,
    /// `AOAI_BACKUP_OUTAPIKEY_SECRET_URIS`: one Key Vault secret per backup, in order.
    pub backup_key_uris: Vec<SecretUri>,
    /// `HEALTH_REFLECTS_CAPACITY`: the health route answers 503 while every upstream is
    /// cooling down or circuit-open.
    pub health_reflects_capacity: bool,
    /// `SPILLOVER_DEFAULT_COOLDOWN_MS`, `SPILLOVER_MAX_COOLDOWN_MS`, `SPILLOVER_CIRCUIT_OPEN_MS`,
    /// `SPILLOVER_STEER_MS`.
    pub tuning: Tuning,
    /// `SPILLOVER_REPLAY_MAX_BYTES`: with backups, a request body declared at most this long is
    /// read before the first attempt so it can be sent again; larger or chunked bodies stream
    /// once and are not retried.
    pub replay_max_bytes: u64,
}

/// Default of `SPILLOVER_REPLAY_MAX_BYTES`: 4 MiB holds any chat or embeddings body (the gated
/// operations are buffered anyway); audio and file uploads above it go once.
pub const DEFAULT_REPLAY_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Entries of a list setting: separated by `,` `;` or newlines, trimmed, empty ones dropped.
fn entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split([',', ';', '\n', '\r'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

impl SpilloverSettings {
    pub fn from_source(src: &Source, primary: &Url, auth: AoaiAuth) -> Result<Self, SettingsError> {
        const BACKUPS: &str = "AOAI_BACKUPS";
        const KEYS: &str = "AOAI_BACKUP_OUTAPIKEYS";
        const URIS: &str = "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS";
        let mut backups: Vec<Url> = Vec::new();
        for entry in src.get(BACKUPS)?.map(entries).into_iter().flatten() {
            let url = parse_base_url(BACKUPS, entry)?;
            if same_resource(&url, primary) {
                return Err(SettingsError::new(
                    BACKUPS,
                    format!("lists {entry:?}, the primary AOAI_HOSTNAME itself"),
                ));
            }
            if backups.iter().any(|b| same_resource(b, &url)) {
                return Err(SettingsError::new(
                    BACKUPS,
                    format!("lists {entry:?} twice"),
                ));
            }
            backups.push(url);
        }
        let keys: Vec<Secret> = src
            .get(KEYS)?
            .map(entries)
            .into_iter()
            .flatten()
            .map(Secret::new)
            .collect();
        let uris: Vec<SecretUri> = src
            .get(URIS)?
            .map(entries)
            .into_iter()
            .flatten()
            .map(|u| SecretUri::parse(URIS, u))
            .collect::<Result<_, _>>()?;
        let count = |name: &'static str, n: usize| {
            if n == backups.len() {
                Ok(())
            } else {
                Err(SettingsError::new(
                    name,
                    format!(
                        "has {n} entr{} but AOAI_BACKUPS lists {} backup{}: give one per backup, \
                         in the same order",
                        if n == 1 { "y" } else { "ies" },
                        backups.len(),
                        if backups.len() == 1 { "" } else { "s" }
                    ),
                ))
            }
        };
        match auth {
            AoaiAuth::ManagedIdentity => {
                for (name, n) in [(KEYS, keys.len()), (URIS, uris.len())] {
                    if n > 0 {
                        return Err(SettingsError::new(
                            name,
                            "is set, but with AOAI_AUTH=managed_identity every backup is called \
                             with the managed identity's token: remove it",
                        ));
                    }
                }
            }
            AoaiAuth::Key => {
                match (keys.is_empty(), uris.is_empty()) {
                    (false, false) => return Err(SettingsError::new(
                        KEYS,
                        "and AOAI_BACKUP_OUTAPIKEY_SECRET_URIS are both set: give the backups' \
                         keys one way",
                    )),
                    (true, true) if !backups.is_empty() => {
                        return Err(SettingsError::new(
                            KEYS,
                            "is required with AOAI_BACKUPS and AOAI_AUTH=key (or set \
                         AOAI_BACKUP_OUTAPIKEY_SECRET_URIS, or use AOAI_AUTH=managed_identity)",
                        ))
                    }
                    (false, true) => count(KEYS, keys.len())?,
                    (true, false) => count(URIS, uris.len())?,
                    (true, true) => {}
                }
            }
        }
        for key in &keys {
            if http::HeaderValue::from_str(key.expose()).is_err() {
                return Err(SettingsError::new(
                    KEYS,
                    "holds a key that is not a valid header value (the key is not shown here)",
                ));
            }
        }

        let millis = |name: &'static str, default: Duration| -> Result<Duration, SettingsError> {
            let v: u64 = src.number(name, default.as_millis() as u64)?;
            if v == 0 || v > 3_600_000 {
                return Err(SettingsError::new(name, "must be between 1 and 3600000"));
            }
            Ok(Duration::from_millis(v))
        };
        let d = Tuning::default();
        let tuning = Tuning {
            default_cool_down: millis("SPILLOVER_DEFAULT_COOLDOWN_MS", d.default_cool_down)?,
            max_cool_down: millis("SPILLOVER_MAX_COOLDOWN_MS", d.max_cool_down)?,
            circuit_open: millis("SPILLOVER_CIRCUIT_OPEN_MS", d.circuit_open)?,
            steer: millis("SPILLOVER_STEER_MS", d.steer)?,
        };
        if tuning.default_cool_down > tuning.max_cool_down {
            // blame the one the operator set (the default one when both are)
            return Err(match src.get("SPILLOVER_DEFAULT_COOLDOWN_MS")? {
                Some(_) => SettingsError::new(
                    "SPILLOVER_DEFAULT_COOLDOWN_MS",
                    "must not be above SPILLOVER_MAX_COOLDOWN_MS",
                ),
                None => SettingsError::new(
                    "SPILLOVER_MAX_COOLDOWN_MS",
                    "must not be below SPILLOVER_DEFAULT_COOLDOWN_MS (1000 unless set)",
                ),
            });
        }
        Ok(SpilloverSettings {
            backups,
            backup_keys: keys,
            backup_key_uris: uris,
            health_reflects_capacity: src.flag("HEALTH_REFLECTS_CAPACITY", false)?,
            tuning,
            replay_max_bytes: src.number("SPILLOVER_REPLAY_MAX_BYTES", DEFAULT_REPLAY_MAX_BYTES)?,
        })
    }
}

/// Same scheme, host and port (the path is empty for every accepted base URL), whatever the
/// spelling: case, a trailing dot (the FQDN form), the default port written out, and every name of
/// the loopback host (`localhost`, `127.0.0.0/8`, `::1`) taken as one.
fn same_resource(a: &Url, b: &Url) -> bool {
    a.scheme().eq_ignore_ascii_case(b.scheme())
        && host_key(a) == host_key(b)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The host as compared by [`same_resource`].
fn host_key(u: &Url) -> Option<String> {
    let host = match u.host()? {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                return Some("loopback".into());
            }
            d
        }
        url::Host::Ipv4(ip) if ip.is_loopback() => return Some("loopback".into()),
        url::Host::Ipv6(ip) if ip.is_loopback() => return Some("loopback".into()),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = "https://p.openai.azure.com";

    fn parse(pairs: &[(&str, &str)], auth: AoaiAuth) -> Result<SpilloverSettings, SettingsError> {
        let src = Source::from_map(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        SpilloverSettings::from_source(&src, &Url::parse(PRIMARY).unwrap(), auth)
    }

    #[test]
    fn unset_is_no_spillover_with_default_tuning() {
        let s = parse(&[], AoaiAuth::Key).unwrap();
        assert!(s.backups.is_empty());
        assert!(!s.health_reflects_capacity);
        assert_eq!(s.tuning, Tuning::default());
        assert_eq!(s.replay_max_bytes, DEFAULT_REPLAY_MAX_BYTES);
        // blank is unset
        assert!(parse(&[("AOAI_BACKUPS", " ")], AoaiAuth::Key)
            .unwrap()
            .backups
            .is_empty());
    }

    #[test]
    fn backups_in_order_with_any_separator_and_form() {
        let s = parse(
            &[
                (
                    "AOAI_BACKUPS",
                    "b1.openai.azure.com;\n https://b2.openai.azure.com/ ,http://127.0.0.1:9,",
                ),
                ("AOAI_BACKUP_OUTAPIKEYS", "k1\nk2;k3"),
            ],
            AoaiAuth::Key,
        )
        .unwrap();
        let hosts: Vec<String> = s.backups.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            hosts,
            [
                "https://b1.openai.azure.com/",
                "https://b2.openai.azure.com/",
                "http://127.0.0.1:9/"
            ]
        );
        let keys: Vec<&str> = s.backup_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["k1", "k2", "k3"]);
    }

    #[test]
    fn a_bad_backup_list_is_named() {
        for (value, why) in [
            ("http://b.openai.azure.com", "plain http off loopback"),
            ("ftp://b", "scheme"),
            ("https://b.openai.azure.com/openai", "a path"),
            ("https://user:pw@b.openai.azure.com", "credentials"),
            ("p.openai.azure.com", "the primary itself"),
            (
                "HTTPS://P.openai.azure.com:443",
                "the primary, spelled differently",
            ),
            ("b.openai.azure.com,b.openai.azure.com", "twice"),
            ("p.openai.azure.com.", "the primary as a trailing-dot FQDN"),
            (
                "https://P.OPENAI.AZURE.COM.:443/",
                "case, dot and port at once",
            ),
            (
                "b.openai.azure.com,B.openai.azure.com.",
                "twice, spelled differently",
            ),
        ] {
            let e = parse(&[("AOAI_BACKUPS", value)], AoaiAuth::ManagedIdentity).unwrap_err();
            assert_eq!(e.name, "AOAI_BACKUPS", "{why}");
        }
    }

    #[test]
    fn loopback_spellings_are_one_host() {
        let src = |b: &str| Source::from_map([("AOAI_BACKUPS".to_string(), b.to_string())]);
        let primary = Url::parse("http://127.0.0.1:19501").unwrap();
        for same in [
            "http://localhost:19501",
            "http://LOCALHOST.:19501",
            "http://127.0.0.2:19501",
            "http://[::1]:19501",
        ] {
            let e = SpilloverSettings::from_source(&src(same), &primary, AoaiAuth::ManagedIdentity)
                .unwrap_err();
            assert_eq!(e.name, "AOAI_BACKUPS", "{same}");
        }
        // another port is another resource
        let ok = SpilloverSettings::from_source(
            &src("http://localhost:19502"),
            &primary,
            AoaiAuth::ManagedIdentity,
        )
        .unwrap();
        assert_eq!(ok.backups.len(), 1);
        for twice in [
            "http://localhost:9,http://127.0.0.1:9",
            "http://[::1]:9;http://LocalHost.:9/",
        ] {
            let e =
                SpilloverSettings::from_source(&src(twice), &primary, AoaiAuth::ManagedIdentity)
                    .unwrap_err();
            assert_eq!(e.name, "AOAI_BACKUPS", "{twice}");
        }
    }

    #[test]
    fn key_counts_must_match_the_backups() {
        let two = ("AOAI_BACKUPS", "b1.openai.azure.com,b2.openai.azure.com");
        for (name, value) in [
            ("AOAI_BACKUP_OUTAPIKEYS", "only-one"),
            ("AOAI_BACKUP_OUTAPIKEYS", "a,b,c"),
            (
                "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
                "https://v.vault.azure.net/secrets/one",
            ),
        ] {
            let e = parse(&[two, (name, value)], AoaiAuth::Key).unwrap_err();
            assert_eq!(e.name, name);
            assert!(e.problem.contains("2 backups"), "{}", e.problem);
            assert!(
                !e.problem.contains("only-one"),
                "a key never reaches a message"
            );
        }
        // no keys at all with key auth
        assert_eq!(
            parse(&[two], AoaiAuth::Key).unwrap_err().name,
            "AOAI_BACKUP_OUTAPIKEYS"
        );
        // keys without backups
        assert_eq!(
            parse(&[("AOAI_BACKUP_OUTAPIKEYS", "k")], AoaiAuth::Key)
                .unwrap_err()
                .name,
            "AOAI_BACKUP_OUTAPIKEYS"
        );
        // both ways at once
        let both = parse(
            &[
                two,
                ("AOAI_BACKUP_OUTAPIKEYS", "a,b"),
                (
                    "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
                    "https://v.vault.azure.net/secrets/a,https://v.vault.azure.net/secrets/b",
                ),
            ],
            AoaiAuth::Key,
        );
        assert_eq!(both.unwrap_err().name, "AOAI_BACKUP_OUTAPIKEYS");
        // secret URIs are checked as URIs
        let e = parse(
            &[
                two,
                (
                    "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
                    "https://v.vault.azure.net/secrets/a,http://v/secrets/b",
                ),
            ],
            AoaiAuth::Key,
        )
        .unwrap_err();
        assert_eq!(e.name, "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS");
        // a key that is not a header value
        let e = parse(
            &[
                ("AOAI_BACKUPS", "b1.openai.azure.com"),
                ("AOAI_BACKUP_OUTAPIKEYS", "bad\u{7f}key"),
            ],
            AoaiAuth::Key,
        )
        .unwrap_err();
        assert_eq!(e.name, "AOAI_BACKUP_OUTAPIKEYS");
        // with the managed identity no keys are taken
        let e = parse(
            &[two, ("AOAI_BACKUP_OUTAPIKEYS", "a,b")],
            AoaiAuth::ManagedIdentity,
        )
        .unwrap_err();
        assert_eq!(e.name, "AOAI_BACKUP_OUTAPIKEYS");
        assert!(parse(&[two], AoaiAuth::ManagedIdentity).is_ok());
        let ok = parse(
            &[
                two,
                (
                    "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
                    "https://v.vault.azure.net/secrets/a;https://v.vault.azure.net/secrets/b/v2",
                ),
            ],
            AoaiAuth::Key,
        )
        .unwrap();
        assert_eq!(ok.backup_key_uris[1].version.as_deref(), Some("v2"));
    }

    #[test]
    fn tuning_is_bounded() {
        for name in [
            "SPILLOVER_DEFAULT_COOLDOWN_MS",
            "SPILLOVER_MAX_COOLDOWN_MS",
            "SPILLOVER_CIRCUIT_OPEN_MS",
            "SPILLOVER_STEER_MS",
        ] {
            for bad in ["0", "3600001", "soon", "-1"] {
                assert_eq!(
                    parse(&[(name, bad)], AoaiAuth::Key).unwrap_err().name,
                    name,
                    "{bad}"
                );
            }
        }
        let e = parse(
            &[
                ("SPILLOVER_DEFAULT_COOLDOWN_MS", "5000"),
                ("SPILLOVER_MAX_COOLDOWN_MS", "4000"),
            ],
            AoaiAuth::Key,
        )
        .unwrap_err();
        assert_eq!(e.name, "SPILLOVER_DEFAULT_COOLDOWN_MS");
        let s = parse(
            &[
                ("SPILLOVER_CIRCUIT_OPEN_MS", "250"),
                ("HEALTH_REFLECTS_CAPACITY", "true"),
            ],
            AoaiAuth::Key,
        )
        .unwrap();
        assert_eq!(s.tuning.circuit_open, Duration::from_millis(250));
        assert!(s.health_reflects_capacity);
        assert_eq!(
            parse(&[("HEALTH_REFLECTS_CAPACITY", "maybe")], AoaiAuth::Key)
                .unwrap_err()
                .name,
            "HEALTH_REFLECTS_CAPACITY"
        );
    }
}
