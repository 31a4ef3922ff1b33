//! Stage 5, **audit**: runs whenever an earlier stage finds a request non-compliant (user
//! missing or unregistered, content blocked, attack detected).
//!
//! Turns the finding into one [`AbuseRecord`] and hands it to [`Audit::submit`], which never
//! blocks the client's answer and never fails the request. Short-circuits nothing.
//!
//! This first version appends each record to the JSON Lines file `AUDIT_LOG_PATH`. The Cosmos DB
//! writer with its bounded queue, retries and durable spool replaces the internals behind the
//! same `submit` call.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::settings::{SettingsError, Source};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The body carried no `user` although the user check requires one.
    MissingUser,
    /// The `user` is not in the registry.
    UnregisteredUser,
    /// The body could not be inspected (not JSON, wrong content type, `user` not a string).
    InvalidBody,
    /// Content Safety found a harm category at or above its threshold, or a blocklist hit.
    ContentFiltered,
    /// Prompt Shields detected a jailbreak in the user prompt.
    JailbreakDetected,
    /// Prompt Shields detected an indirect attack in documents or tool content.
    IndirectAttackDetected,
}

/// One non-compliant request. Partition key: `user` (`"(none)"` when the request named none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbuseRecord {
    /// Idempotent id: the request id plus the reason, so a replay never duplicates.
    pub id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub request_id: String,
    pub caller: String,
    pub user: String,
    pub deployment: Option<String>,
    pub operation: String,
    pub reason: Reason,
    /// Verdict details: categories and severities, shield results, blocklist hits.
    pub details: serde_json::Value,
    /// The prompt text, only when `AUDIT_CAPTURE_PROMPT=true`.
    pub prompt: Option<String>,
    /// `X-Forwarded-For` as AppGW set it.
    pub client_ip: Option<String>,
}

/// Partition key value for requests that named no user.
pub const NO_USER: &str = "(none)";

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `AUDIT_LOG_PATH`: JSON Lines sink when Cosmos DB is not configured.
    pub log_path: PathBuf,
    /// `AUDIT_CAPTURE_PROMPT`: put the prompt text into abuse records.
    pub capture_prompt: bool,
}

impl AuditSettings {
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        Ok(AuditSettings {
            log_path: PathBuf::from(src.get("AUDIT_LOG_PATH")?.unwrap_or("abuse-log.jsonl")),
            capture_prompt: src.flag("AUDIT_CAPTURE_PROMPT", false)?,
        })
    }
}

/// The abuse log.
pub struct Audit {
    settings: AuditSettings,
    file: Mutex<()>,
}

impl Audit {
    pub fn new(settings: AuditSettings) -> Self {
        Audit {
            settings,
            file: Mutex::new(()),
        }
    }

    pub fn capture_prompt(&self) -> bool {
        self.settings.capture_prompt
    }

    /// Record one non-compliant request. Never fails the request: a write problem is logged.
    pub fn submit(&self, record: AbuseRecord) {
        let _guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| -> std::io::Result<()> {
            let mut line = serde_json::to_vec(&record)?;
            line.push(b'\n');
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.settings.log_path)?;
            f.write_all(&line)?;
            f.sync_data()
        })();
        match result {
            Ok(()) => tracing::info!(
                target: "audit",
                record_id = %record.id,
                reason = ?record.reason,
                "abuse record written"
            ),
            Err(e) => tracing::error!(
                target: "audit",
                record_id = %record.id,
                error = %e,
                "abuse record could not be written"
            ),
        }
    }
}
