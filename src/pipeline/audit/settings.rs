//! The audit settings, parsed once (no file system access here: [`super::paths`] turns them
//! into directories at start).

use std::path::PathBuf;
use std::time::Duration;

use crate::clients::cosmos::CosmosSettings;
use crate::settings::{SettingsError, Source};

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `AUDIT_DIR`: the base directory of the per-instance audit directories. Default
    /// `$HOME/data/aoai-fwdproxy`, else (no `HOME`, or not writable) the temp directory.
    pub dir: Option<PathBuf>,
    /// `HOME` (App Service: `/home`, persistent).
    pub home: Option<PathBuf>,
    /// `WEBSITE_INSTANCE_ID` (App Service, distinct per scaled-out instance); the host name
    /// when unset.
    pub instance: Option<String>,
    /// `AUDIT_LOG_PATH`: the JSON Lines file (the journal itself) when Cosmos DB is not
    /// configured. Relative paths are under the per-instance directory.
    pub log_path: Option<PathBuf>,
    /// `AUDIT_SPOOL_PATH`: the write-ahead journal when Cosmos DB is configured. Relative paths
    /// are under the per-instance directory.
    pub spool_path: Option<PathBuf>,
    /// `AUDIT_CAPTURE_PROMPT`: put the prompt text into abuse records.
    pub capture_prompt: bool,
    /// `COSMOS_*`: the abuse log in Cosmos DB, when `COSMOS_ENDPOINT` is set.
    pub cosmos: Option<CosmosSettings>,
    /// `AUDIT_QUEUE_CAPACITY`: records waiting for the journal thread before callers wait.
    pub queue_capacity: usize,
    /// `AUDIT_WRITE_CONCURRENCY`: upserts in flight at once.
    pub concurrency: usize,
    /// `AUDIT_WRITE_TIMEOUT_MS`: one upsert (with the SDK's own retries) may take this long.
    pub write_timeout: Duration,
    /// `AUDIT_MAX_ATTEMPTS`: tries per record in one shipping pass; then the pass pauses.
    pub max_attempts: u32,
    /// `AUDIT_RETRY_BASE_MS`: first backoff between tries (doubles, with jitter, up to 5 s).
    pub retry_base: Duration,
    /// `AUDIT_REPLAY_INTERVAL_MS`: first pause of the shipper while Cosmos DB is down (doubles
    /// up to 60 s).
    pub replay_interval: Duration,
    /// `AUDIT_FLUSH_TIMEOUT_MS`: how long SIGTERM gives the shipper to empty the journal into
    /// Cosmos DB (what is left stays in the journal for the next start).
    pub flush_timeout: Duration,
}

impl AuditSettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        let positive = |name: &'static str, default: u64| -> Result<u64, SettingsError> {
            let v = src.number(name, default)?;
            if v == 0 {
                return Err(SettingsError::new(name, "must be above 0"));
            }
            Ok(v)
        };
        let queue_capacity = positive("AUDIT_QUEUE_CAPACITY", 10_000)?;
        if queue_capacity > 1_000_000 {
            return Err(SettingsError::new(
                "AUDIT_QUEUE_CAPACITY",
                "must be at most 1000000 (records wait in memory)",
            ));
        }
        let concurrency = positive("AUDIT_WRITE_CONCURRENCY", 16)?;
        if concurrency > 256 {
            return Err(SettingsError::new(
                "AUDIT_WRITE_CONCURRENCY",
                "must be between 1 and 256",
            ));
        }
        let max_attempts = positive("AUDIT_MAX_ATTEMPTS", 5)?;
        if max_attempts > 100 {
            return Err(SettingsError::new(
                "AUDIT_MAX_ATTEMPTS",
                "must be between 1 and 100",
            ));
        }
        let dir = src.get("AUDIT_DIR")?.map(PathBuf::from);
        if dir.as_ref().is_some_and(|d| d.is_relative()) {
            return Err(SettingsError::new(
                "AUDIT_DIR",
                "must be an absolute path (the working directory is a read-only package mount on Azure)",
            ));
        }
        Ok(AuditSettings {
            dir,
            home: src.get("HOME")?.map(PathBuf::from),
            instance: src.get("WEBSITE_INSTANCE_ID")?.map(str::to_string),
            log_path: src.get("AUDIT_LOG_PATH")?.map(PathBuf::from),
            spool_path: src.get("AUDIT_SPOOL_PATH")?.map(PathBuf::from),
            capture_prompt: src.flag("AUDIT_CAPTURE_PROMPT", true)?,
            cosmos: CosmosSettings::from_source(src)?,
            queue_capacity: queue_capacity as usize,
            concurrency: concurrency as usize,
            write_timeout: Duration::from_millis(positive("AUDIT_WRITE_TIMEOUT_MS", 10_000)?),
            max_attempts: max_attempts as u32,
            retry_base: Duration::from_millis(src.number("AUDIT_RETRY_BASE_MS", 200u64)?),
            replay_interval: Duration::from_millis(positive("AUDIT_REPLAY_INTERVAL_MS", 5_000)?),
            flush_timeout: Duration::from_millis(src.number("AUDIT_FLUSH_TIMEOUT_MS", 10_000u64)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let s =
            AuditSettings::from_source(&Source::from_map(Vec::<(String, String)>::new())).unwrap();
        assert_eq!(s.queue_capacity, 10_000);
        assert!(s.cosmos.is_none() && s.log_path.is_none() && s.dir.is_none());
        for (k, v) in [
            ("AUDIT_QUEUE_CAPACITY", "0"),
            ("AUDIT_QUEUE_CAPACITY", "many"),
            ("AUDIT_WRITE_CONCURRENCY", "1000"),
            ("AUDIT_MAX_ATTEMPTS", "0"),
            ("AUDIT_DIR", "relative/dir"),
        ] {
            let e = AuditSettings::from_source(&Source::from_map([(k, v)])).unwrap_err();
            assert_eq!(e.name, k);
        }
    }
}
