//! The flag reference (docs/configuration.md) against the binaries'
//! `--help`, which clap renders from the same `Command` read here: every
//! flag documented, every documented flag real, the defaults the same.

use std::collections::BTreeMap;

use clap::{ArgAction, Command, CommandFactory};

/// The rows of the table under `### \`BINARY\``: each flag of a row's first
/// cell, with the row's default cell.
fn documented(binary: &str) -> BTreeMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let text = std::fs::read_to_string(path).expect("docs/configuration.md");
    let heading = format!("### `{binary}`");
    let section = text
        .split_once(&heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {heading:?} section"))
        .1;
    let section = section.split("\n### ").next().unwrap_or(section);
    let mut flags = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `--")) {
        // `\|` inside a cell is not a column break.
        let row = row.replace("\\|", "\u{0}");
        let cells: Vec<&str> = row.split(" | ").collect();
        assert!(
            cells.len() >= 3,
            "{binary}: a row without three cells: {row}"
        );
        for token in cells[0].split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if let Some(name) = token.strip_prefix("--").filter(|n| !n.is_empty()) {
                flags.insert(name.to_owned(), cells[1].replace('\u{0}', "|"));
            }
        }
    }
    assert!(!flags.is_empty(), "{binary}: no flag rows found");
    flags
}

fn check(binary: &str, command: Command) {
    let docs = documented(binary);
    let mut errors = Vec::new();
    let mut real = Vec::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if arg.is_hide_set() || matches!(long, "help" | "version") {
            continue;
        }
        real.push(long.to_owned());
        let Some(cell) = docs.get(long) else {
            errors.push(format!("--{long} is not documented"));
            continue;
        };
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        match arg.get_action() {
            ArgAction::SetTrue => {
                if cell.trim() != "off" {
                    errors.push(format!("--{long} is off by default; the docs say {cell:?}"));
                }
            }
            _ => {
                for d in &defaults {
                    if !cell.contains(&format!("`{d}`")) {
                        errors.push(format!("--{long} defaults to {d:?}; the docs say {cell:?}"));
                    }
                }
            }
        }
    }
    for flag in docs.keys() {
        if !real.contains(flag) {
            errors.push(format!(
                "--{flag} is documented but {binary} has no such flag"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "docs/configuration.md disagrees with {binary} --help:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn the_control_plane_flags_are_documented_as_they_are() {
    check(
        "switchyard-control-plane",
        switchyard_control_plane::Args::command(),
    );
}

#[test]
fn the_agent_flags_are_documented_as_they_are() {
    check("switchyard-agent", switchyard_agent::Args::command());
}

#[test]
fn the_readme_starts_with_the_two_commands_and_links_what_exists() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let first_screen: String = readme.lines().take(40).collect::<Vec<_>>().join("\n");
    for command in ["./scripts/demo.sh", "./scripts/test.sh"] {
        assert!(
            first_screen.contains(command),
            "the README's first screen lacks {command}"
        );
    }
    // Every relative link of the README and docs/ names a file that exists.
    let mut pages = vec![("README.md".to_owned(), readme.clone())];
    for entry in std::fs::read_dir(format!("{root}/docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("a page");
        pages.push((
            format!("docs/{}", path.file_name().expect("name").to_string_lossy()),
            text,
        ));
    }
    for (page, text) in &pages {
        let dir = std::path::Path::new(root).join(page);
        let dir = dir.parent().expect("a directory");
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or_default();
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            assert!(
                dir.join(target).exists(),
                "{page} links to {target}, which does not exist"
            );
        }
    }
}
