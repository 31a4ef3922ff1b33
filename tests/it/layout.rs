//! Keeps the integration tests one binary per package (`tests/it`, `devkit/tests/it`): every
//! `.rs` file in an `it/` folder is a module of its `main.rs` (a file without its `mod` line
//! would never compile nor run), and no test file sits directly in `tests/` (cargo would build
//! it as a test binary of its own, linked against the whole dependency tree again). See
//! `tests/README.md`.

use std::collections::BTreeSet;
use std::path::Path;

fn rs_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The test folders of the workspace's packages.
const TEST_DIRS: [&str; 2] = ["tests", "devkit/tests"];

#[test]
fn every_file_of_an_it_folder_is_a_module_of_its_main() {
    for tests in TEST_DIRS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(tests).join("it");
        assert!(rs_files(&dir).len() > 2, "{tests}/it/ holds the tests");
        let missing = undeclared(&dir);
        assert!(
            missing.is_empty(),
            "{tests}/it/ holds {missing:?} without a `mod` line in {tests}/it/main.rs: they never run"
        );
    }
}

/// The `.rs` files of `dir` (but `main.rs`) that `dir/main.rs` declares no `mod` for.
fn undeclared(dir: &Path) -> Vec<String> {
    let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
    let declared: BTreeSet<String> = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mod "))
        .filter_map(|l| l.strip_suffix(';'))
        .map(|m| format!("{m}.rs"))
        .collect();
    rs_files(dir)
        .into_iter()
        .filter(|f| f != "main.rs" && !declared.contains(f))
        .collect()
}

/// The check sees a file without its `mod` line, and a commented-out one does not count.
#[test]
fn the_module_check_finds_a_file_main_does_not_declare() {
    let dir = crate::support::scratch::Scratch::new("layout");
    std::fs::write(
        dir.file("main.rs"),
        "mod a;\n// mod b;\n#[path = \"x\"]\nmod c;\n",
    )
    .unwrap();
    for f in ["a.rs", "b.rs", "c.rs", "d.rs"] {
        std::fs::write(dir.file(f), "").unwrap();
    }
    assert_eq!(undeclared(dir.path()), ["b.rs", "d.rs"]);
}

#[test]
fn no_test_binary_of_its_own_in_tests() {
    for tests in TEST_DIRS {
        let stray = rs_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join(tests));
        assert!(
            stray.is_empty(),
            "{stray:?} in {tests}/ would each be a test binary of their own: `git mv` them into \
             {tests}/it/, add `mod <name>;` to {tests}/it/main.rs and replace `mod common;` / \
             `mod support;` with `use crate::common;` / `use crate::support;` (tests/README.md)"
        );
    }
}
