//! Keeps the README's settings table and `local.settings.json.example` true: every setting the
//! code reads must appear in both, and both must name nothing the code does not read.

use std::collections::BTreeSet;
use std::path::Path;

/// Setting names in `src/`: every string literal shaped like one (`"UPPER_CASE_WORDS"`), which is
/// how settings are named wherever they are read (`Source::get`, `require`, `number`, `flag`, and
/// helpers that take the name as an argument).
fn settings_in_code() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for literal in text.split('"').skip(1).step_by(2) {
                let shaped = literal.len() > 3
                    && literal.contains('_')
                    && literal.starts_with(|c: char| c.is_ascii_uppercase())
                    && !literal.ends_with('_')
                    && literal
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if shaped && !literal.starts_with("CARGO_") {
                    names.insert(literal.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn readme_table_lists_every_setting() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table: String = readme
        .split("## Settings")
        .nth(1)
        .expect("README has a Settings section")
        .split("\n## ")
        .next()
        .unwrap()
        .to_string();
    let mut missing = Vec::new();
    for name in settings_in_code() {
        // thresholds are listed as CONTENT_SAFETY_THRESHOLD_HATE, `_SELFHARM`, ...
        let short = name
            .strip_prefix("CONTENT_SAFETY_THRESHOLD")
            .map(|s| format!("`{s}`"));
        let listed =
            table.contains(&format!("`{name}`")) || short.is_some_and(|s| table.contains(&s));
        if !listed {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "README's settings table lacks {missing:?}"
    );
}

#[test]
fn local_settings_example_lists_every_setting() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("local.settings.json.example");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(doc["IsEncrypted"], false);
    let values = doc["Values"].as_object().unwrap();
    assert_eq!(values["FUNCTIONS_WORKER_RUNTIME"], "custom");
    let code = settings_in_code();
    let platform = [
        "FUNCTIONS_WORKER_RUNTIME",
        "AzureWebJobsStorage",
        "FUNCTIONS_CUSTOMHANDLER_PORT",
    ];
    // settings only meaningful in Azure, or for debugging, need not be in the local example
    let azure_only = [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "REGION_NAME",
        "WEBSITE_INSTANCE_ID",
        "RUST_LOG",
        "FWDPROXY_LOCAL_SETTINGS",
    ];
    let missing: Vec<_> = code
        .iter()
        .filter(|n| {
            !values.contains_key(*n)
                && !platform.contains(&n.as_str())
                && !azure_only.contains(&n.as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "local.settings.json.example lacks {missing:?}"
    );
    let unknown: Vec<_> = values
        .keys()
        .filter(|k| !code.contains(*k) && !platform.contains(&k.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "local.settings.json.example names settings the code never reads: {unknown:?}"
    );
}
