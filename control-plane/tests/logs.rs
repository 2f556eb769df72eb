//! The real binary's logs: plain text when stdout is not a terminal (a
//! pipe here, journald or `kubectl logs` in production), so no ANSI colour
//! codes end up in log files.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-control-plane"))
        .args([
            "--source",
            concat!("file:", env!("CARGO_MANIFEST_DIR"), "/../examples"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the control plane binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let started = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let done = line.contains("control plane started");
                lines.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "no \"control plane started\" line; got {lines:?}");
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a piped log: {line:?}"
        );
        assert!(line.contains("INFO") || line.contains("WARN"), "{line:?}");
    }
}

/// Reads the binary's log lines until one contains `marker`; returns every
/// line read (bounded: 20 s without it fails with what was read).
fn lines_until(rx: &mpsc::Receiver<String>, marker: &str, lines: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let done = line.contains(marker);
                lines.push(line);
                if done {
                    return;
                }
            }
            Err(_) => panic!("no {marker:?} line within 20 s; got {lines:#?}"),
        }
    }
}

/// A cause is logged at WARN once, not on every rebuild: a missing
/// `file:` path and an ignored kind stay for several rebuilds and are each
/// one line; the recovery is one INFO line.
#[test]
fn each_cause_is_warned_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    std::fs::write(
        manifests.join("typo.yaml"),
        "apiVersion: v1\nkind: Servce\nmetadata: {name: x, namespace: shop}\n",
    )
    .expect("write");
    let missing = dir.path().join("later");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-control-plane"))
        .arg("--source")
        .arg(format!("file:{}", manifests.display()))
        .arg("--source")
        .arg(format!("file:{}", missing.display()))
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--debounce",
            "10ms",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the control plane binary starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    lines_until(&rx, "control plane started", &mut lines);
    // Three more states of the first source, each a rebuild with both
    // causes still there.
    for i in 0..3 {
        std::fs::write(
            manifests.join(format!("s{i}.yaml")),
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: shop}}\nspec: {{ports: [{{port: 80}}]}}\n"),
        )
        .expect("write");
        lines_until(&rx, &format!("services={}", i + 1), &mut lines);
    }
    // The path appears: the control plane gets ready.
    std::fs::create_dir(&missing).expect("mkdir");
    lines_until(&rx, "snapshot built", &mut lines);
    let _ = child.kill();
    let _ = child.wait();

    let count = |level: &str, text: &str| {
        lines
            .iter()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    };
    let missing_name = missing.display().to_string();
    assert_eq!(
        count("WARN", "source failing"),
        1,
        "the missing path, once: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("source failing") && l.contains(&missing_name)),
        "{lines:#?}"
    );
    assert_eq!(
        count("WARN", "did you mean Service"),
        1,
        "the ignored kind, once: {lines:#?}"
    );
    assert_eq!(count("INFO", "source recovered"), 1, "{lines:#?}");
}
