//! Where the journal lives: never relative to the working directory (on Azure the app root is
//! a read-only mount of the package).
//!
//! The per-instance directory is `<base>/<instance>`, where `<base>` is `AUDIT_DIR`, else
//! `$HOME/data/aoai-fwdproxy` (persistent on App Service), else — with a warning — the temp
//! directory's `aoai-fwdproxy`; `<instance>` is `WEBSITE_INSTANCE_ID` (distinct per scaled-out
//! instance, so instances sharing `/home` never share a journal), else the host name. The first
//! base that can be created and written wins; when none can, the start is refused, naming each
//! place tried. An explicit absolute `AUDIT_LOG_PATH` / `AUDIT_SPOOL_PATH` is used as given
//! (its directory must be writable, or the start is refused naming the setting); a relative one
//! is taken under the per-instance directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::settings::AuditSettings;
use crate::settings::SettingsError;

/// Default file name of the journal without Cosmos DB (it is the abuse log itself).
pub const LOG_FILE: &str = "abuse-log.jsonl";
/// Default file name of the write-ahead journal shipped to Cosmos DB.
pub const JOURNAL_FILE: &str = "abuse-journal.jsonl";

/// The journal's path, and the setting an operator changes to move it.
#[derive(Debug, Clone)]
pub struct JournalPath {
    pub path: PathBuf,
    pub setting: &'static str,
}

/// Resolve the journal path for these settings (Cosmos configured or not), creating its
/// directory and proving it writable.
pub fn resolve(settings: &AuditSettings) -> Result<JournalPath, SettingsError> {
    let (explicit, setting, default) = if settings.cosmos.is_some() {
        (&settings.spool_path, "AUDIT_SPOOL_PATH", JOURNAL_FILE)
    } else {
        (&settings.log_path, "AUDIT_LOG_PATH", LOG_FILE)
    };
    if let Some(p) = explicit.as_ref().filter(|p| p.is_absolute()) {
        let dir = p.parent().unwrap_or(Path::new("/"));
        prepare(dir).map_err(|e| {
            SettingsError::new(setting, format!("{} cannot be written: {e}", dir.display()))
        })?;
        return Ok(JournalPath {
            path: p.clone(),
            setting,
        });
    }
    let dir = instance_dir(settings)?;
    let path = match explicit {
        Some(rel) => dir.join(rel),
        None => dir.join(default),
    };
    if let Some(parent) = path.parent() {
        prepare(parent).map_err(|e| {
            SettingsError::new(
                setting,
                format!("{} cannot be written: {e}", parent.display()),
            )
        })?;
    }
    Ok(JournalPath { path, setting })
}

/// The instance's name: `WEBSITE_INSTANCE_ID`, else the host name, as one safe path segment.
pub fn instance_name(settings: &AuditSettings) -> String {
    sanitize(settings.instance.clone().unwrap_or_else(hostname).as_str())
}

/// The per-instance directory (see the module doc).
pub fn instance_dir(settings: &AuditSettings) -> Result<PathBuf, SettingsError> {
    let instance = instance_name(settings);
    let mut bases: Vec<(PathBuf, &str)> = Vec::new();
    match &settings.dir {
        Some(d) => bases.push((d.clone(), "AUDIT_DIR")),
        None => {
            // a relative HOME would put records under the working directory (read-only on
            // the platform): only an absolute one counts
            if let Some(home) = settings.home.as_ref().filter(|h| h.is_absolute()) {
                bases.push((home.join("data").join("aoai-fwdproxy"), "HOME"));
            }
            bases.push((std::env::temp_dir().join("aoai-fwdproxy"), "temp directory"));
        }
    }
    let mut tried = Vec::new();
    for (i, (base, what)) in bases.iter().enumerate() {
        let dir = base.join(&instance);
        match prepare(&dir) {
            Ok(()) => {
                if i > 0 || settings.home.is_none() && settings.dir.is_none() {
                    tracing::warn!(
                        target: "audit",
                        dir = %dir.display(),
                        tried = %tried.join("; "),
                        "abuse records go to the temp directory, which may not survive a restart of the instance: set AUDIT_DIR to a persistent directory"
                    );
                }
                return Ok(dir);
            }
            Err(e) => tried.push(format!("{} ({what}): {e}", dir.display())),
        }
    }
    Err(SettingsError::new(
        "AUDIT_DIR",
        format!(
            "no writable place for abuse records: tried {}",
            tried.join("; ")
        ),
    ))
}

/// The journal of another kind of record beside `journal` (same directory): `abuse-` at the
/// start of the file name becomes `<kind>-` (`abuse-journal.jsonl` → `usage-journal.jsonl`),
/// any other name gets `<kind>-` in front (`journal.jsonl` → `usage-journal.jsonl`).
pub fn companion(journal: &Path, kind: &str) -> PathBuf {
    let name = journal
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = name.strip_prefix("abuse-").unwrap_or(&name);
    journal.with_file_name(format!("{kind}-{rest}"))
}

/// Create `dir` and prove a file can be created, written and synced in it.
fn prepare(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let result = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(b"probe")?;
            f.sync_data()
        });
    let _ = std::fs::remove_file(&probe);
    result
}

fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "local".to_string())
}

/// A safe single path segment: `[A-Za-z0-9._-]`, at most 64 characters, never `.` or `..`.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "instance".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Source;

    fn settings(pairs: &[(&str, &str)]) -> AuditSettings {
        AuditSettings::from_source(&Source::from_map(pairs.iter().copied())).unwrap()
    }

    #[test]
    fn a_relative_home_is_never_used() {
        let s = settings(&[("HOME", "relhome"), ("WEBSITE_INSTANCE_ID", "rel1")]);
        let j = resolve(&s).unwrap();
        assert!(j.path.is_absolute(), "{}", j.path.display());
        assert!(
            j.path.starts_with(std::env::temp_dir()),
            "{}",
            j.path.display()
        );
    }

    #[test]
    fn per_instance_directory_under_home_data() {
        let home = tempfile::tempdir().unwrap();
        let s = settings(&[
            ("HOME", home.path().to_str().unwrap()),
            ("WEBSITE_INSTANCE_ID", "abc123"),
        ]);
        let j = resolve(&s).unwrap();
        assert_eq!(
            j.path,
            home.path().join("data/aoai-fwdproxy/abc123").join(LOG_FILE)
        );
        assert_eq!(j.setting, "AUDIT_LOG_PATH");
        // relative paths are under the instance directory, never the working directory
        let s = settings(&[
            ("HOME", home.path().to_str().unwrap()),
            ("WEBSITE_INSTANCE_ID", "abc123"),
            ("AUDIT_LOG_PATH", "sub/x.jsonl"),
        ]);
        assert_eq!(
            resolve(&s).unwrap().path,
            home.path().join("data/aoai-fwdproxy/abc123/sub/x.jsonl")
        );
    }

    #[test]
    fn unwritable_places_fall_back_or_refuse_naming_them() {
        let root = tempfile::tempdir().unwrap();
        // a file where a directory should be: cannot be created, even as root
        let blocker = root.path().join("blocker");
        std::fs::write(&blocker, b"x").unwrap();
        let s = settings(&[
            ("HOME", blocker.to_str().unwrap()),
            ("WEBSITE_INSTANCE_ID", "i1"),
        ]);
        let dir = instance_dir(&s).unwrap();
        assert!(dir.starts_with(std::env::temp_dir()), "{dir:?}");
        let s = settings(&[("AUDIT_DIR", blocker.to_str().unwrap())]);
        let e = instance_dir(&s).unwrap_err();
        assert_eq!(e.name, "AUDIT_DIR");
        assert!(e.to_string().contains("blocker"), "{e}");
        let s = settings(&[(
            "AUDIT_LOG_PATH",
            blocker.join("log.jsonl").to_str().unwrap(),
        )]);
        assert_eq!(resolve(&s).unwrap_err().name, "AUDIT_LOG_PATH");
    }

    #[test]
    fn companion_journals_sit_beside_the_abuse_journal() {
        let dir = Path::new("/d/i1");
        for (abuse, usage) in [
            ("abuse-journal.jsonl", "usage-journal.jsonl"),
            ("journal.jsonl", "usage-journal.jsonl"),
            ("spool", "usage-spool"),
        ] {
            assert_eq!(companion(&dir.join(abuse), "usage"), dir.join(usage));
        }
    }

    #[test]
    fn instance_names_are_one_safe_segment() {
        assert_eq!(sanitize("../../etc"), ".._.._etc");
        assert_eq!(sanitize(".."), "instance");
        assert_eq!(sanitize(""), "instance");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 64);
        assert_eq!(sanitize("pd0sdwk00001V/x y"), "pd0sdwk00001V_x_y");
    }
}
