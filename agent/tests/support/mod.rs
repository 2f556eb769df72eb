//! What the data-plane tests share: a network namespace of their own.

use std::process::{Command, Output};

/// A network namespace that is deleted when dropped (also on a panic).
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates `swy-TAG-PID`; `None` (with a note) where namespaces cannot
    /// be made (not root, no iproute2).
    pub fn new(tag: &str) -> Option<Self> {
        let name = format!("swy-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        Some(Self(name))
    }

    /// Runs `sh -c CMD` in the namespace.
    pub fn run(&self, cmd: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec")
    }

    /// Runs `sh -c CMD` in the namespace: its standard output.
    #[allow(dead_code, reason = "the nftables tests read nft's output and status")]
    pub fn sh(&self, cmd: &str) -> String {
        String::from_utf8_lossy(&self.run(cmd).stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
