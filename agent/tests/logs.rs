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
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-agent"))
        .args([
            "--node-name",
            "log-test",
            "--dataplane",
            "none",
            "--dns-listen",
            "none",
            "--admin-listen",
            "127.0.0.1:0",
            // Nothing listens there: the agent logs its failed connection too.
            "--control-plane",
            "http://127.0.0.1:9",
            "--state-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent binary starts");
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
                let done = line.contains("agent started");
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
    assert!(started, "no \"agent started\" line; got {lines:?}");
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a piped log: {line:?}"
        );
        assert!(line.contains("INFO") || line.contains("WARN"), "{line:?}");
    }
}
