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

/// The managed-identity stub is one per process and counts token requests per client id, so two
/// tests sharing a client id see each other's requests (a spillover test did, once the tests
/// became one binary). Every client-id literal (a UUID) belongs to one test function.
#[test]
fn each_managed_identity_client_id_belongs_to_one_test() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let clashes = shared_ids(rs_files(&dir).into_iter().map(|f| {
        let text = std::fs::read_to_string(dir.join(&f)).unwrap();
        (f, text)
    }));
    assert!(
        clashes.is_empty(),
        "client ids used by more than one test: {clashes:?}"
    );
}

/// UUID literals that occur in more than one test function (a test function starts at a
/// `#[test]`/`#[tokio::test…]` attribute; occurrences before the first one count as their own).
fn shared_ids(files: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut owner: std::collections::BTreeMap<String, (String, usize)> = Default::default();
    let mut clashes = BTreeSet::new();
    for (file, text) in files {
        let mut test = 0;
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("#[test]") || t.starts_with("#[tokio::test") {
                test += 1;
            }
            for id in uuids(line) {
                let here = (file.clone(), test);
                match owner.get(&id) {
                    Some(first) if *first != here => {
                        clashes.insert(id);
                    }
                    Some(_) => {}
                    None => {
                        owner.insert(id, here);
                    }
                }
            }
        }
    }
    clashes.into_iter().collect()
}

fn uuids(line: &str) -> Vec<String> {
    let b = line.as_bytes();
    let shape = |w: &[u8]| {
        w.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
    };
    (0..b.len().saturating_sub(35))
        .filter(|&i| shape(&b[i..i + 36]))
        .map(|i| line[i..i + 36].to_string())
        .collect()
}

#[test]
fn the_client_id_check_finds_a_shared_id() {
    let id = "0123abcd-0000-4000-8000-00000000c1d0";
    let a = format!("#[tokio::test]\nasync fn a() {{ let x = \"{id}\"; let y = \"{id}\"; }}\n");
    let b = format!("#[test]\nfn b() {{ let z = \"{id}\"; }}\n");
    assert!(shared_ids([("a.rs".to_string(), a.clone())].into_iter()).is_empty());
    assert_eq!(
        shared_ids([("a.rs".to_string(), a), ("b.rs".to_string(), b)].into_iter()),
        [id]
    );
}
