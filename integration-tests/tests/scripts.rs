//! The scripts and documents a newcomer runs first: binaries are found
//! where cargo puts them (CARGO_TARGET_DIR honoured), and every documented
//! `cargo run` builds the release profile the scripts build, so nothing is
//! built twice.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

#[test]
fn the_target_directory_is_cargos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wanted = dir.path().join("elsewhere");
    let out = Command::new(root().join("scripts/target-dir.sh"))
        .current_dir(root())
        .env("CARGO_TARGET_DIR", &wanted)
        .output()
        .expect("scripts/target-dir.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        wanted.display().to_string()
    );
}

#[test]
fn no_script_looks_for_binaries_under_a_fixed_target() {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join("scripts")).expect("scripts/") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "sh") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for (n, line) in text.lines().enumerate() {
            let code = line.split('#').next().unwrap_or_default();
            // `target/` at the start of a path: the workspace's default
            // target directory, which CARGO_TARGET_DIR moves.
            // (`$target/` is a variable, `<target>/` a placeholder.)
            let fixed = code.match_indices("target/").any(|(i, _)| {
                i == 0
                    || !matches!(code.as_bytes()[i - 1], b'$' | b'{' | b'<' | b'_')
                        && !code.as_bytes()[i - 1].is_ascii_alphanumeric()
            });
            if fixed {
                found.push(format!("{}:{}: {line}", path.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "ask scripts/target-dir.sh instead:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_documented_cargo_run_builds_the_release_profile() {
    let mut documents: Vec<PathBuf> = std::fs::read_dir(root())
        .expect("root")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    if let Ok(docs) = std::fs::read_dir(root().join("docs")) {
        documents.extend(
            docs.map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "md")),
        );
    }
    documents.push(root().join("integration-tests/src/bin/fake_apiserver.rs"));
    let mut runs = 0;
    let mut debug = Vec::new();
    for path in &documents {
        let text = std::fs::read_to_string(path).expect("read");
        for (n, line) in text.lines().enumerate() {
            if line.contains("cargo run") {
                runs += 1;
                if !line.contains("--release") {
                    debug.push(format!("{}:{}: {line}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(runs > 0, "no `cargo run` found in {documents:?}");
    assert!(
        debug.is_empty(),
        "a `cargo run` without --release builds a second (debug) profile:\n{}",
        debug.join("\n")
    );
}
