//! Typed settings, parsed once at startup.
//!
//! Settings are App Service app settings, which the Functions host hands to the handler as
//! environment variables. For local runs the handler also reads the `Values` of
//! `local.settings.json` (as `func start` does); a variable set in the environment wins over the
//! file. Every value is checked here, so a bad or missing one stops the start with a message that
//! names the setting, instead of failing on the first request. Secrets live in [`Secret`], whose
//! `Debug` prints `*****`, so no key reaches a log line by accident.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use url::Url;

use crate::clients::identity::IdentitySettings;
use crate::clients::keyvault::KeyVaultSettings;
use crate::pipeline::audit::AuditSettings;
use crate::pipeline::content_safety::ContentSafetySettings;
use crate::pipeline::forward::SpilloverSettings;
use crate::pipeline::policy::PolicySettings;

/// Default port when `FUNCTIONS_CUSTOMHANDLER_PORT` is unset (the Functions host always sets it;
/// 7072 sits next to the host's own 7071 so both can run side by side locally).
pub const DEFAULT_PORT: u16 = 7072;
/// The Azure front end ends any HTTP-triggered call at 230 s; upstream calls must end before.
pub const FRONT_END_LIMIT: Duration = Duration::from_secs(230);
/// The Functions host refuses request bodies over 100 MB, so a larger limit would never apply.
pub const HOST_BODY_LIMIT: u64 = 100 * 1024 * 1024;
/// Shortest internal key we accept: shorter keys are guessable.
pub const MIN_KEY_LEN: usize = 16;

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: call only where it is put on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// One caller that may use the proxy: a name for logs and its internal key.
#[derive(Clone, Debug)]
pub struct CallerKey {
    pub name: String,
    pub key: Secret,
}

/// Everything the handler needs, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `FUNCTIONS_CUSTOMHANDLER_PORT`.
    pub port: u16,
    /// `AOAI_HOSTNAME`, as a base URL without trailing slash (`https://name.openai.azure.com`).
    pub aoai_base: Url,
    /// `AOAI_INAPIKEY` (caller `default`) and `AOAI_INAPIKEYS` (named callers).
    pub callers: Vec<CallerKey>,
    /// `AOAI_AUTH`: how the handler authenticates to AOAI.
    pub aoai_auth: AoaiAuth,
    /// `AOAI_OUTAPIKEY`: the real AOAI key (`None` when it comes from Key Vault or the handler
    /// uses its managed identity).
    pub aoai_key: Option<Secret>,
    /// `AOAI_CONNECT_TIMEOUT_MS`.
    pub connect_timeout: Duration,
    /// `AOAI_TIMEOUT_MS`: the whole exchange counted from the request's arrival (screening, the
    /// AOAI call and its streamed answer).
    pub upstream_timeout: Duration,
    /// `MAX_BODY_BYTES`.
    pub max_body_bytes: u64,
    /// `SHUTDOWN_GRACE_MS`: how long SIGTERM waits for in-flight requests and streams.
    pub shutdown_grace: Duration,
    /// `HEADER_READ_TIMEOUT_MS`: how long a connection may take to send a request's headers,
    /// counted from when the server starts waiting for them (so it also bounds how long an idle
    /// keep-alive connection stays open).
    pub header_read_timeout: Duration,
    /// `USER_CHECK`, `REGISTERED_USERS`.
    pub policy: PolicySettings,
    /// `CONTENT_SAFETY_*`; `None` when screening is off.
    pub content_safety: Option<ContentSafetySettings>,
    /// `AUDIT_*`, `COSMOS_*`.
    pub audit: AuditSettings,
    /// `AZURE_CLIENT_ID`.
    pub identity: IdentitySettings,
    /// `*_SECRET_URI`, `KEYVAULT_REFRESH_SECS`.
    pub keyvault: KeyVaultSettings,
    /// `CALLER_TOKEN_LIMITS`, `BUDGET_DEFAULT_COMPLETION_TOKENS`.
    pub budget: BudgetSettings,
    /// `AOAI_BACKUPS`, their keys, `HEALTH_REFLECTS_CAPACITY`, `SPILLOVER_*`.
    pub spillover: SpilloverSettings,
}

/// Per-caller token budgets (see `pipeline::budget`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetSettings {
    /// `CALLER_TOKEN_LIMITS` entries `name:tokens_per_minute`, in order.
    pub limits: Vec<(String, u64)>,
    /// The `*` entry: the limit of every caller not named.
    pub every_other: Option<u64>,
    /// `BUDGET_DEFAULT_COMPLETION_TOKENS`: the completion tokens reserved for a request that sets
    /// no `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub default_completion_tokens: u64,
}

impl BudgetSettings {
    /// Parse `CALLER_TOKEN_LIMITS` (`name:tokens_per_minute` pairs separated by `,` `;` or
    /// newlines; `*` for every caller not named). Every name must be a configured caller, so a
    /// typo cannot leave a caller unlimited unnoticed.
    pub fn from_source(src: &Source, callers: &[CallerKey]) -> Result<Self, SettingsError> {
        const NAME: &str = "CALLER_TOKEN_LIMITS";
        let default_completion_tokens = src.number("BUDGET_DEFAULT_COMPLETION_TOKENS", 1024u64)?;
        let mut out = BudgetSettings {
            default_completion_tokens,
            ..Default::default()
        };
        let Some(list) = src.get(NAME)? else {
            return Ok(out);
        };
        for entry in list
            .split([',', ';', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (name, limit) = entry.split_once(':').ok_or_else(|| {
                err(
                    NAME,
                    format!("each entry must be name:tokens_per_minute, got {entry:?}"),
                )
            })?;
            let (name, limit) = (name.trim(), limit.trim());
            let limit: u64 = limit.parse().ok().filter(|l| *l > 0).ok_or_else(|| {
                err(
                    NAME,
                    format!("the limit of {name:?} must be a whole number above 0, got {limit:?}"),
                )
            })?;
            if name == "*" {
                if out.every_other.replace(limit).is_some() {
                    return Err(err(NAME, "names * twice"));
                }
                continue;
            }
            if !callers.iter().any(|c| c.name == name) {
                return Err(err(
                    NAME,
                    format!("names {name:?}, which is not a caller of AOAI_INAPIKEY (default) or AOAI_INAPIKEYS"),
                ));
            }
            if out.limits.iter().any(|(n, _)| n == name) {
                return Err(err(NAME, format!("names {name:?} twice")));
            }
            out.limits.push((name.to_string(), limit));
        }
        Ok(out)
    }
}

/// `AOAI_AUTH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AoaiAuth {
    /// `api-key: AOAI_OUTAPIKEY` (or the Key Vault secret `AOAI_OUTAPIKEY_SECRET_URI`).
    Key,
    /// `Authorization: Bearer` from the Function App's managed identity (keyless).
    ManagedIdentity,
}

/// A setting that is missing or malformed, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct SettingsError {
    pub name: &'static str,
    pub problem: String,
}

impl SettingsError {
    pub fn new(name: &'static str, problem: impl Into<String>) -> Self {
        err(name, problem)
    }
}

fn err(name: &'static str, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        name,
        problem: problem.into(),
    }
}

/// Where settings come from: a flat map of names to values.
pub struct Source {
    values: HashMap<String, String>,
}

impl Source {
    /// The process environment over the `Values` of `local.settings.json` (or the file named by
    /// `FWDPROXY_LOCAL_SETTINGS`) when one exists in the working directory.
    pub fn from_environment() -> Result<Self, SettingsError> {
        let path = std::env::var("FWDPROXY_LOCAL_SETTINGS")
            .unwrap_or_else(|_| "local.settings.json".to_string());
        let mut values = if Path::new(&path).exists() {
            read_local_settings(Path::new(&path))?
        } else {
            HashMap::new()
        };
        values.extend(std::env::vars());
        Ok(Source { values })
    }

    pub fn from_map<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Source {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A non-empty value, trimmed; an empty value counts as unset (App Service shows unset
    /// settings as empty strings in some tools).
    pub fn get(&self, name: &'static str) -> Result<Option<&str>, SettingsError> {
        match self.values.get(name).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) if v.starts_with("@Microsoft.KeyVault(") => Err(err(
                name,
                "is an unresolved Key Vault reference: give the Function App's identity the \
                 'Key Vault Secrets User' role and check the secret URI",
            )),
            Some(v) => Ok(Some(v)),
        }
    }

    pub fn require(&self, name: &'static str) -> Result<&str, SettingsError> {
        self.get(name)?.ok_or_else(|| err(name, "is required"))
    }

    pub fn number<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: T,
    ) -> Result<T, SettingsError> {
        match self.get(name)? {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| err(name, format!("must be a whole number, got {v:?}"))),
        }
    }
}

impl Source {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`), default when unset.
    pub fn flag(&self, name: &'static str, default: bool) -> Result<bool, SettingsError> {
        match self.get(name)?.map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(v) => Err(err(name, format!("must be true or false, got {v:?}"))),
        }
    }
}

fn read_local_settings(path: &Path) -> Result<HashMap<String, String>, SettingsError> {
    let name = "FWDPROXY_LOCAL_SETTINGS";
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(name, format!("cannot read {}: {e}", path.display())))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| err(name, format!("{} is not valid JSON: {e}", path.display())))?;
    let mut values = HashMap::new();
    if let Some(map) = doc.get("Values").and_then(|v| v.as_object()) {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            values.insert(k.clone(), v);
        }
    }
    Ok(values)
}

impl Settings {
    /// Settings from the environment (and `local.settings.json`).
    pub fn load() -> Result<Self, SettingsError> {
        Self::from_source(&Source::from_environment()?)
    }

    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let port = src.number("FUNCTIONS_CUSTOMHANDLER_PORT", DEFAULT_PORT)?;
        let aoai_base = parse_base_url("AOAI_HOSTNAME", src.require("AOAI_HOSTNAME")?)?;
        let callers = parse_callers(src.get("AOAI_INAPIKEY")?, src.get("AOAI_INAPIKEYS")?)?;
        let keyvault = KeyVaultSettings::from_source(src)?;
        let aoai_auth = match src
            .get("AOAI_AUTH")?
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("key") => AoaiAuth::Key,
            Some("managed_identity") => AoaiAuth::ManagedIdentity,
            Some(other) => {
                return Err(err(
                    "AOAI_AUTH",
                    format!("must be key or managed_identity, got {other:?}"),
                ))
            }
        };
        let aoai_key = src.get("AOAI_OUTAPIKEY")?.map(Secret::new);
        if aoai_auth == AoaiAuth::Key && aoai_key.is_none() && keyvault.aoai_key.is_none() {
            return Err(err(
                "AOAI_OUTAPIKEY",
                "is required with AOAI_AUTH=key (or set AOAI_OUTAPIKEY_SECRET_URI, or use \
                 AOAI_AUTH=managed_identity)",
            ));
        }

        let connect_timeout =
            Duration::from_millis(src.number("AOAI_CONNECT_TIMEOUT_MS", 10_000u64)?);
        let upstream_timeout = Duration::from_millis(src.number("AOAI_TIMEOUT_MS", 220_000u64)?);
        if upstream_timeout.is_zero() || upstream_timeout >= FRONT_END_LIMIT {
            return Err(err(
                "AOAI_TIMEOUT_MS",
                "must be above 0 and below 230000 (the Azure front end ends calls at 230 s; \
                 the handler must answer 504 before that)",
            ));
        }
        if connect_timeout.is_zero() || connect_timeout > upstream_timeout {
            return Err(err(
                "AOAI_CONNECT_TIMEOUT_MS",
                "must be above 0 and not above AOAI_TIMEOUT_MS",
            ));
        }
        let max_body_bytes = src.number("MAX_BODY_BYTES", HOST_BODY_LIMIT)?;
        if max_body_bytes == 0 || max_body_bytes > HOST_BODY_LIMIT {
            return Err(err(
                "MAX_BODY_BYTES",
                format!("must be between 1 and {HOST_BODY_LIMIT} (the Functions host limit)"),
            ));
        }
        let shutdown_grace = Duration::from_millis(src.number("SHUTDOWN_GRACE_MS", 230_000u64)?);
        let header_read_timeout =
            Duration::from_millis(src.number("HEADER_READ_TIMEOUT_MS", 120_000u64)?);
        if header_read_timeout.is_zero() || header_read_timeout > Duration::from_secs(3600) {
            return Err(err(
                "HEADER_READ_TIMEOUT_MS",
                "must be between 1 and 3600000 (idle and half-open connections must close)",
            ));
        }

        let budget = BudgetSettings::from_source(src, &callers)?;
        let spillover = SpilloverSettings::from_source(src, &aoai_base, aoai_auth)?;
        Ok(Settings {
            port,
            aoai_base,
            callers,
            aoai_auth,
            aoai_key,
            connect_timeout,
            upstream_timeout,
            max_body_bytes,
            shutdown_grace,
            header_read_timeout,
            policy: PolicySettings::from_source(src)?,
            content_safety: ContentSafetySettings::from_source(src)?,
            audit: AuditSettings::from_source(src)?,
            identity: IdentitySettings::from_source(src)?,
            budget,
            keyvault,
            spillover,
        })
    }
}

/// True for hosts that never leave the machine.
pub fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// A bare host (`name.openai.azure.com` → https) or a full base URL. Plain `http://` is refused
/// unless the host is loopback: keys must not cross a network in clear text.
pub fn parse_base_url(name: &'static str, value: &str) -> Result<Url, SettingsError> {
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("https://{value}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|e| err(name, format!("is not a host name or URL ({e}): {value:?}")))?;
    let host = url
        .host()
        .ok_or_else(|| err(name, format!("has no host: {value:?}")))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&host) => {}
        "http" => {
            return Err(err(
                name,
                "uses http:// for a non-loopback host; use https (http is only for local runs)",
            ))
        }
        other => return Err(err(name, format!("has unsupported scheme {other:?}"))),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(err(name, "must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(err(name, "must not carry a query or fragment"));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(err(
            name,
            "must be a host or a base URL without a path (the handler adds /openai/...)",
        ));
    }
    Ok(url)
}

/// `AOAI_INAPIKEY` is one key for caller `default`; `AOAI_INAPIKEYS` is `name:key` pairs
/// separated by commas, semicolons or newlines. At least one key must exist: the handler fails
/// closed instead of letting everyone in.
fn parse_callers(
    single: Option<&str>,
    many: Option<&str>,
) -> Result<Vec<CallerKey>, SettingsError> {
    let mut callers = Vec::new();
    if let Some(key) = single {
        check_key("AOAI_INAPIKEY", key)?;
        callers.push(CallerKey {
            name: "default".into(),
            key: Secret::new(key),
        });
    }
    if let Some(list) = many {
        for entry in list
            .split([',', ';', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (name, key) = entry.split_once(':').ok_or_else(|| {
                err(
                    "AOAI_INAPIKEYS",
                    "each entry must be name:key (the key is not shown here)",
                )
            })?;
            let (name, key) = (name.trim(), key.trim());
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !name_ok {
                return Err(err(
                    "AOAI_INAPIKEYS",
                    format!("caller name {name:?} must be 1-64 of A-Z a-z 0-9 - _ ."),
                ));
            }
            check_key("AOAI_INAPIKEYS", key)?;
            if callers.iter().any(|c: &CallerKey| c.name == name) {
                return Err(err(
                    "AOAI_INAPIKEYS",
                    format!("caller {name:?} is listed twice"),
                ));
            }
            callers.push(CallerKey {
                name: name.into(),
                key: Secret::new(key),
            });
        }
    }
    if callers.is_empty() {
        return Err(err(
            "AOAI_INAPIKEY",
            "is required (or AOAI_INAPIKEYS): without an internal key the proxy would let \
             everyone in, so it refuses to start",
        ));
    }
    for (i, a) in callers.iter().enumerate() {
        if callers[i + 1..].iter().any(|b| b.key == a.key) {
            return Err(err("AOAI_INAPIKEYS", "two callers share one key"));
        }
    }
    Ok(callers)
}

fn check_key(name: &'static str, key: &str) -> Result<(), SettingsError> {
    if key.chars().count() < MIN_KEY_LEN {
        return Err(err(
            name,
            format!("keys must be at least {MIN_KEY_LEN} characters"),
        ));
    }
    if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(err(
            name,
            "keys must not contain spaces or control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "internal-key-0123456789";

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AOAI_HOSTNAME", "myaoai.openai.azure.com"),
            ("AOAI_INAPIKEY", KEY),
            ("AOAI_OUTAPIKEY", "real-key"),
        ]
    }

    fn with(extra: &[(&'static str, &'static str)]) -> Result<Settings, SettingsError> {
        let mut pairs = base();
        for (k, v) in extra {
            pairs.retain(|(n, _)| n != k);
            pairs.push((k, v));
        }
        Settings::from_source(&Source::from_map(pairs))
    }

    #[test]
    fn bare_host_becomes_https() {
        let s = with(&[]).unwrap();
        assert_eq!(s.aoai_base.as_str(), "https://myaoai.openai.azure.com/");
        assert_eq!(s.port, DEFAULT_PORT);
        assert_eq!(s.callers[0].name, "default");
    }

    #[test]
    fn http_only_for_loopback() {
        assert!(with(&[("AOAI_HOSTNAME", "http://127.0.0.1:9999")]).is_ok());
        assert!(with(&[("AOAI_HOSTNAME", "http://localhost:9999")]).is_ok());
        assert!(with(&[("AOAI_HOSTNAME", "http://[::1]:9999")]).is_ok());
        let e = with(&[("AOAI_HOSTNAME", "http://myaoai.openai.azure.com")]).unwrap_err();
        assert_eq!(e.name, "AOAI_HOSTNAME");
        assert!(with(&[("AOAI_HOSTNAME", "https://x.openai.azure.com/openai")]).is_err());
        assert!(with(&[("AOAI_HOSTNAME", "ftp://x")]).is_err());
    }

    #[test]
    fn missing_internal_key_refuses_to_start() {
        let src = Source::from_map(vec![
            ("AOAI_HOSTNAME", "x.openai.azure.com"),
            ("AOAI_OUTAPIKEY", "k"),
            ("AOAI_INAPIKEY", "  "),
        ]);
        let e = Settings::from_source(&src).unwrap_err();
        assert_eq!(e.name, "AOAI_INAPIKEY");
        assert!(e.to_string().contains("refuses to start"));
    }

    #[test]
    fn named_callers_parse_and_are_checked() {
        let s = with(&[(
            "AOAI_INAPIKEYS",
            "app-a:aaaaaaaaaaaaaaaaaaaa; app-b:bbbbbbbbbbbbbbbbbbbb",
        )])
        .unwrap();
        let names: Vec<_> = s.callers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["default", "app-a", "app-b"]);
        assert!(with(&[("AOAI_INAPIKEYS", "nokey")]).is_err());
        assert!(with(&[("AOAI_INAPIKEYS", "a:short")]).is_err());
        assert!(with(&[("AOAI_INAPIKEYS", "a b:aaaaaaaaaaaaaaaaaaaa")]).is_err());
        assert!(with(&[("AOAI_INAPIKEYS", &*format!("dup:{KEY}").leak())]).is_err());
    }

    #[test]
    fn errors_never_show_keys() {
        let e = with(&[("AOAI_INAPIKEYS", "app:sekrit")]).unwrap_err();
        assert!(!e.to_string().contains("sekrit"));
        let s = with(&[]).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(KEY) && !dbg.contains("real-key"), "{dbg}");
    }

    #[test]
    fn timeouts_respect_front_end_limit() {
        assert!(with(&[("AOAI_TIMEOUT_MS", "230000")]).is_err());
        assert!(with(&[("AOAI_TIMEOUT_MS", "0")]).is_err());
        assert!(with(&[("AOAI_TIMEOUT_MS", "soon")]).is_err());
        assert!(with(&[
            ("AOAI_TIMEOUT_MS", "1000"),
            ("AOAI_CONNECT_TIMEOUT_MS", "2000")
        ])
        .is_err());
        assert!(with(&[("MAX_BODY_BYTES", "104857601")]).is_err());
        assert!(with(&[("HEADER_READ_TIMEOUT_MS", "0")]).is_err());
        assert!(with(&[("HEADER_READ_TIMEOUT_MS", "3600001")]).is_err());
        assert!(with(&[("HEADER_READ_TIMEOUT_MS", "soon")]).is_err());
        assert_eq!(
            with(&[("HEADER_READ_TIMEOUT_MS", "1500")])
                .unwrap()
                .header_read_timeout,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn aoai_auth_modes_and_where_the_key_comes_from() {
        let s = with(&[]).unwrap();
        assert_eq!(s.aoai_auth, AoaiAuth::Key);
        let keyless = Settings::from_source(&Source::from_map(vec![
            ("AOAI_HOSTNAME", "x.openai.azure.com"),
            ("AOAI_INAPIKEY", KEY),
            ("AOAI_AUTH", "managed_identity"),
        ]))
        .unwrap();
        assert_eq!(keyless.aoai_auth, AoaiAuth::ManagedIdentity);
        assert!(keyless.aoai_key.is_none());
        let no_key = Source::from_map(vec![
            ("AOAI_HOSTNAME", "x.openai.azure.com"),
            ("AOAI_INAPIKEY", KEY),
        ]);
        assert_eq!(
            Settings::from_source(&no_key).unwrap_err().name,
            "AOAI_OUTAPIKEY"
        );
        let from_vault = Settings::from_source(&Source::from_map(vec![
            ("AOAI_HOSTNAME", "x.openai.azure.com"),
            ("AOAI_INAPIKEY", KEY),
            (
                "AOAI_OUTAPIKEY_SECRET_URI",
                "https://v.vault.azure.net/secrets/aoai-key",
            ),
        ]))
        .unwrap();
        assert!(from_vault.keyvault.aoai_key.is_some());
        assert_eq!(
            with(&[("AOAI_AUTH", "password")]).unwrap_err().name,
            "AOAI_AUTH"
        );
    }

    #[test]
    fn unresolved_key_vault_reference_is_named() {
        let e = with(&[(
            "AOAI_OUTAPIKEY",
            "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/k)",
        )])
        .unwrap_err();
        assert_eq!(e.name, "AOAI_OUTAPIKEY");
        assert!(e.problem.contains("Key Vault"));
    }
}
