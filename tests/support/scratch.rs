//! Temporary files and directories: the one way tests get them. Each [`Scratch`] is a fresh
//! directory removed when dropped (`tempfile`), so parallel tests and reruns never share files.

use std::path::{Path, PathBuf};

pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix(&format!("fwdproxy-{tag}-"))
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the directory (nothing is created).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A fresh file path in its own directory that lives until the process ends (for helpers whose
/// callers keep only the path, such as `common::temp_path`).
pub fn leaked_file(tag: &str, name: &str) -> PathBuf {
    let scratch = Box::leak(Box::new(Scratch::new(tag)));
    scratch.file(name)
}

/// Read a JSON Lines file (missing file: no lines). A line that is not JSON fails the test.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}
