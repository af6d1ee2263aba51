//! Every committed fuzz corpus input (`fuzz/corpus/<target>/`) through its target's body
//! (`airstate::fuzzing`), in the default test run: what the fuzzers found once, and the
//! hand-written seeds, stay checked on stable without `cargo fuzz` (README, "Fuzzing").

use std::path::PathBuf;

use airstate::fuzzing::{run, TARGETS};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus")).join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_input_keeps_its_targets_invariants() {
    for target in TARGETS {
        let files = corpus(target);
        assert!(
            files.len() >= 5,
            "{target}: only {} corpus inputs",
            files.len()
        );
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(target, &data));
            assert!(outcome.is_ok(), "{target}: {} fails", file.display());
        }
    }
}

/// Each fuzz target named by the library has its file and its corpus, and no other exists.
#[test]
fn the_fuzz_crate_has_a_target_per_parser() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz");
    let mut files: Vec<String> = std::fs::read_dir(format!("{root}/fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = TARGETS.iter().map(|t| format!("{t}.rs")).collect();
    expected.sort();
    assert_eq!(files, expected);
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\n[workspace]\n"),
        "the fuzz crate is its own workspace"
    );
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "{target}"
        );
    }
}
