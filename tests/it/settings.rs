//! Every setting the handler reads, mistyped or out of range, stops the start with a message
//! that names it — one table through `Settings` parsing (every class of bad value for every
//! boolean, enum and number), and a sample of it through the real binary (exit code 2, the name
//! on stderr and in the JSON log line). The Content Safety settings have their own tests (the
//! screening suite).

use crate::common;

use aoai_fwdproxy::pipeline::policy::UserCheck;
use aoai_fwdproxy::settings::AoaiAuth;
use common::support::app::{base_pairs, merge, try_settings};
use common::support::handler::run_to_exit;
use common::*;

const UPSTREAM: &str = "http://127.0.0.1:9";
const COSMOS: (&str, &str) = ("COSMOS_ENDPOINT", "https://acct.documents.azure.com:443/");

/// Boolean settings and the values that mean true / false.
const FLAGS: &[&str] = &["AUDIT_CAPTURE_PROMPT", "HEALTH_REFLECTS_CAPACITY"];
const TRUE: &[&str] = &["true", "TRUE", "True", "1", "yes", "on", " true "];
const FALSE: &[&str] = &["false", "FALSE", "0", "no", "off"];
/// Values that are neither: a typo must never be read as either meaning.
const NOT_BOOLEAN: &[&str] = &[
    "ture", "flase", "2", "y", "n", "enabled", "true!", "t rue", "-1", "null",
];

/// Enum settings: name, accepted values, mistyped values.
const ENUMS: &[(&str, &[&str], &[&str])] = &[
    (
        "USER_CHECK",
        &["off", "present", "registered", "Registered", "OFF"],
        &[
            "registerd",
            "register",
            "on",
            "true",
            "none",
            "required",
            "registered users",
            "1",
        ],
    ),
    (
        "AOAI_AUTH",
        &["key", "managed_identity", "Managed_Identity", "KEY"],
        &[
            "mi",
            "managed-identity",
            "managedidentity",
            "msi",
            "keys",
            "api-key",
            "entra",
            "none",
        ],
    ),
];

/// Settings a row needs besides the one under test.
type Extra = &'static [(&'static str, &'static str)];

/// Whole numbers: name, extra settings the number needs to be read, accepted values, values
/// out of range or not whole numbers.
const NUMBERS: &[(&str, Extra, &[&str], &[&str])] = &[
    (
        "FUNCTIONS_CUSTOMHANDLER_PORT",
        &[],
        &["0", "7072", "65535"],
        &["65536", "-1", "http", "80.5"],
    ),
    (
        "AOAI_TIMEOUT_MS",
        &[("AOAI_CONNECT_TIMEOUT_MS", "1")],
        &["1", "229999"],
        &["0", "230000", "999999999", "1e3", "-5"],
    ),
    (
        "AOAI_CONNECT_TIMEOUT_MS",
        &[],
        &["1", "220000"],
        &["0", "220001", "10s", "-1"],
    ),
    (
        "MAX_BODY_BYTES",
        &[],
        &["1", "104857600"],
        &["0", "104857601", "100MB", "-1"],
    ),
    (
        "SHUTDOWN_GRACE_MS",
        &[],
        &["0", "230000"],
        &["soon", "-1", "1.5", "18446744073709551616"],
    ),
    (
        "HEADER_READ_TIMEOUT_MS",
        &[],
        &["1", "3600000"],
        &["0", "3600001", "2m", "-1"],
    ),
    (
        "AUDIT_DIR",
        &[],
        &["/home/data/aoai-fwdproxy"],
        &["data/aoai"],
    ),
    (
        "BATCH_MAX_LINES",
        &[],
        &["1", "100000"],
        &["0", "100001", "many", "-1"],
    ),
    (
        "UPLOAD_UNSCREENED_PURPOSES",
        &[],
        &["fine-tune", "fine-tune, assistants"],
        &["batch", "fine-tune,BATCH"],
    ),
    (
        "BUDGET_DEFAULT_COMPLETION_TOKENS",
        &[],
        &["0", "1024", "128000"],
        &["-1", "lots", "1.5"],
    ),
    (
        "KEYVAULT_REFRESH_SECS",
        &[],
        &["0", "3600"],
        &["hourly", "-1", "1h"],
    ),
    (
        "AUDIT_QUEUE_CAPACITY",
        &[],
        &["1", "10000"],
        &["0", "many", "-1"],
    ),
    (
        "AUDIT_WRITE_CONCURRENCY",
        &[],
        &["1", "16"],
        &["0", "1000", "x"],
    ),
    (
        "AUDIT_WRITE_TIMEOUT_MS",
        &[],
        &["1", "10000"],
        &["0", "ten"],
    ),
    ("AUDIT_MAX_ATTEMPTS", &[], &["1", "5"], &["0", "five"]),
    ("AUDIT_RETRY_BASE_MS", &[], &["0", "200"], &["x", "-200"]),
    (
        "AUDIT_REPLAY_INTERVAL_MS",
        &[],
        &["1", "5000"],
        &["0", "5s"],
    ),
    (
        "AUDIT_FLUSH_TIMEOUT_MS",
        &[],
        &["0", "10000"],
        &["soon", "-1"],
    ),
    (
        "COSMOS_USERS_REFRESH_SECS",
        &[COSMOS],
        &["1", "300"],
        &["0x10", "-1", "five minutes"],
    ),
    (
        "SPILLOVER_DEFAULT_COOLDOWN_MS",
        &[],
        &["1", "1000", "60000"],
        &["0", "60001", "soon"],
    ),
    (
        "SPILLOVER_MAX_COOLDOWN_MS",
        &[],
        &["1000", "3600000"],
        &["0", "999", "3600001", "-1"],
    ),
    (
        "SPILLOVER_CIRCUIT_OPEN_MS",
        &[],
        &["1", "5000", "3600000"],
        &["0", "3600001", "5s"],
    ),
    (
        "SPILLOVER_STEER_MS",
        &[],
        &["1", "1000"],
        &["0", "3600001", "1e3"],
    ),
    (
        "SPILLOVER_REPLAY_MAX_BYTES",
        &[],
        &["0", "4194304"],
        &["-1", "4MB"],
    ),
];

/// Other settings with a shape: name, extra settings, a bad value.
const SHAPED: &[(&str, Extra, &str)] = &[
    ("AOAI_BACKUPS", &[], "http://b.openai.azure.com"),
    ("AOAI_BACKUPS", &[], "https://b.openai.azure.com/openai"),
    ("AOAI_BACKUPS", &[], "http://127.0.0.1:9,http://127.0.0.1:9"),
    ("AOAI_BACKUPS", &[], UPSTREAM),
    (
        "AOAI_BACKUP_OUTAPIKEYS",
        &[("AOAI_BACKUPS", "b.openai.azure.com")],
        "k1,k2",
    ),
    ("AOAI_BACKUP_OUTAPIKEYS", &[], "k1"),
    (
        "AOAI_BACKUP_OUTAPIKEY_SECRET_URIS",
        &[("AOAI_BACKUPS", "b.openai.azure.com")],
        "http://v.vault.azure.net/secrets/k",
    ),
    ("AOAI_HOSTNAME", &[], "http://x.openai.azure.com"),
    ("AOAI_HOSTNAME", &[], "ftp://x.openai.azure.com"),
    ("AOAI_HOSTNAME", &[], "https://x.openai.azure.com/openai"),
    ("AOAI_HOSTNAME", &[], "https://user:pw@x.openai.azure.com"),
    ("AOAI_HOSTNAME", &[], "https://x.openai.azure.com?a=1"),
    ("AOAI_HOSTNAME", &[], "https://"),
    ("AOAI_INAPIKEY", &[], "short"),
    ("AOAI_INAPIKEY", &[], "has a space in it 0123456789"),
    ("AOAI_INAPIKEYS", &[], "no-colon-here-0123456789"),
    ("AOAI_INAPIKEYS", &[], "bad name:0123456789abcdefghij"),
    (
        "AOAI_INAPIKEYS",
        &[],
        "a:0123456789abcdefghij,a:abcdefghij0123456789",
    ),
    ("AOAI_INAPIKEYS", &[], "twin:test-internal-key-0123456789"),
    (
        "AOAI_OUTAPIKEY",
        &[],
        "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/k)",
    ),
    ("AZURE_CLIENT_ID", &[], "not-a-guid"),
    (
        "AOAI_OUTAPIKEY_SECRET_URI",
        &[],
        "http://v.vault.azure.net/secrets/k",
    ),
    (
        "AOAI_OUTAPIKEY_SECRET_URI",
        &[],
        "https://v.vault.azure.net/keys/k",
    ),
    ("COSMOS_KEY_SECRET_URI", &[], "https://v.vault.azure.net/"),
    ("COSMOS_ENDPOINT", &[], "http://acct.documents.azure.com"),
];

fn refused(name: &str, extra: &[(&str, &str)], value: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = extra.to_vec();
    pairs.push((name, value));
    match try_settings(UPSTREAM, &pairs) {
        Ok(_) => panic!("{name}={value:?} was accepted"),
        Err(e) => {
            assert_eq!(e.name, name, "{name}={value:?} blamed {}: {e}", e.name);
            let text = e.to_string();
            assert!(text.contains(name), "{text}");
            for secret in [IN_KEY, OUT_KEY, OTHER_KEY] {
                assert!(!text.contains(secret), "{text}");
            }
            text
        }
    }
}

fn accepted(name: &str, extra: &[(&str, &str)], value: &str) -> aoai_fwdproxy::settings::Settings {
    let mut pairs: Vec<(&str, &str)> = extra.to_vec();
    pairs.push((name, value));
    try_settings(UPSTREAM, &pairs).unwrap_or_else(|e| panic!("{name}={value:?} refused: {e}"))
}

#[test]
fn booleans_accept_only_true_or_false_words() {
    let mut checked = 0;
    for name in FLAGS {
        let read = |s: &aoai_fwdproxy::settings::Settings| match *name {
            "HEALTH_REFLECTS_CAPACITY" => s.spillover.health_reflects_capacity,
            _ => s.audit.capture_prompt,
        };
        for v in TRUE {
            let s = accepted(name, &[], v);
            assert!(read(&s), "{name}={v:?}");
            checked += 1;
        }
        for v in FALSE {
            let s = accepted(name, &[], v);
            assert!(!read(&s), "{name}={v:?}");
            checked += 1;
        }
        for v in NOT_BOOLEAN {
            let text = refused(name, &[], v);
            assert!(text.contains("true or false"), "{text}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        FLAGS.len() * (TRUE.len() + FALSE.len() + NOT_BOOLEAN.len())
    );
}

#[test]
fn enums_accept_only_their_words() {
    let mut checked = 0;
    for (name, good, bad) in ENUMS {
        for v in *good {
            let s = accepted(name, &[], v);
            let lower = v.to_ascii_lowercase();
            match *name {
                "USER_CHECK" => assert_eq!(
                    s.policy.user_check,
                    match lower.as_str() {
                        "off" => UserCheck::Off,
                        "present" => UserCheck::Present,
                        _ => UserCheck::Registered,
                    },
                    "{name}={v:?}"
                ),
                "AOAI_AUTH" => assert_eq!(
                    s.aoai_auth,
                    if lower == "key" {
                        AoaiAuth::Key
                    } else {
                        AoaiAuth::ManagedIdentity
                    },
                    "{name}={v:?}"
                ),
                other => panic!("no check for {other}"),
            }
            checked += 1;
        }
        for v in *bad {
            let text = refused(name, &[], v);
            // the message names the accepted words, so the operator can fix the typo
            assert!(text.contains(&good[0].to_ascii_lowercase()), "{text}");
            checked += 1;
        }
    }
    let expected: usize = ENUMS.iter().map(|(_, g, b)| g.len() + b.len()).sum();
    assert_eq!(checked, expected);
}

#[test]
fn numbers_out_of_range_or_not_whole_stop_the_start() {
    let mut checked = 0;
    for (name, extra, good, bad) in NUMBERS {
        for v in *good {
            accepted(name, extra, v);
            checked += 1;
        }
        for v in *bad {
            refused(name, extra, v);
            checked += 1;
        }
    }
    let expected: usize = NUMBERS.iter().map(|(_, _, g, b)| g.len() + b.len()).sum();
    assert_eq!(checked, expected);
}

#[test]
fn shaped_settings_refuse_what_does_not_fit() {
    for (name, extra, value) in SHAPED {
        refused(name, extra, value);
    }
    // Empty counts as unset: a required setting left empty is missing, not empty.
    assert_eq!(try_settings("", &[]).unwrap_err().name, "AOAI_HOSTNAME");
}

/// Every setting the code reads (as tests/it/docs.rs finds them) is exercised by this file or is
/// one the screening suite covers: a new setting without a negative test fails here.
#[test]
fn every_setting_has_a_row() {
    let src = std::fs::read_to_string(file!()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for call in [
                "flag(\"",
                "number(\"",
                "get(\"",
                "require(\"",
                "positive(\"",
            ] {
                for piece in text.split(call).skip(1) {
                    let name: String = piece.chars().take_while(|c| *c != '"').collect();
                    if name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                    {
                        names.insert(name);
                    }
                }
            }
        }
    }
    // Free text or paths with no wrong shape, the platform's own, and the screening suite's.
    let free = [
        "REGISTERED_USERS",
        "AOAI_OUTAPIKEY",
        "COSMOS_KEY",
        "COSMOS_DATABASE",
        "COSMOS_CONTAINER",
        "COSMOS_USERS_CONTAINER",
        "COSMOS_REGION",
        "REGION_NAME",
        "AUDIT_LOG_PATH",
        "AUDIT_SPOOL_PATH",
        "HOME",
        "WEBSITE_INSTANCE_ID",
    ];
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !n.starts_with("CONTENT_SAFETY_"))
        .filter(|n| !free.contains(&n.as_str()))
        .filter(|n| !src.contains(&format!("\"{n}\"")))
        .collect();
    assert!(names.len() > 20, "found the settings: {names:?}");
    assert!(missing.is_empty(), "settings without a row: {missing:?}");
}

/// Through the real binary: one of each class stops the process with exit code 2, the setting
/// named on stderr and in the log line, no secret shown.
#[test]
fn the_binary_refuses_to_start_naming_the_setting() {
    let cases = [
        ("USER_CHECK", "registerd"),
        ("AOAI_AUTH", "mi"),
        ("AUDIT_CAPTURE_PROMPT", "ture"),
        ("MAX_BODY_BYTES", "0"),
        ("AOAI_TIMEOUT_MS", "230000"),
        ("AUDIT_WRITE_CONCURRENCY", "1000"),
    ];
    for (name, value) in cases {
        let env = merge(base_pairs(UPSTREAM), [(name, value)]);
        let (status, stdout, stderr) = run_to_exit(&env);
        assert_eq!(status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(
            stderr.contains("refuses to start") && stderr.contains(name),
            "{name}: {stderr}"
        );
        let logged = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["setting"] == name && v["level"] == "ERROR");
        assert!(
            logged,
            "{name}: the JSON log line names the setting: {stdout}"
        );
        for secret in [IN_KEY, OUT_KEY, OTHER_KEY] {
            assert!(!stdout.contains(secret) && !stderr.contains(secret));
        }
        assert!(
            !stdout.contains("\"message\":\"ready\""),
            "{name}: it must not serve"
        );
    }
}
