//! Every command a data plane runs goes through a [`Runner`]: in the
//! agent's own network namespace, or through `ip netns exec NAME` for tests
//! and benchmarks. What is common to the planes is here (`sysctl`, whether
//! a family's tools work, which conntrack table to clean); the iptables
//! plane adds its own commands in `crate::iptables::runner`.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::Family;
use crate::conntrack::Conntrack;

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command could not be started (not installed?).
    #[error("running {command}")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The program and its arguments.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said, with the offending input line when it named one.
        stderr: String,
    },
}

/// Result of this module.
pub type Result<T, E = RunError> = std::result::Result<T, E>;

/// Runs the tools, in this network namespace or, for tests and benchmarks,
/// through `ip netns exec NAME`.
#[derive(Debug, Clone, Default)]
pub struct Runner {
    netns: Option<String>,
    /// Per family, once asked: whether iptables is the nf_tables variant
    /// (the iptables plane then reads chain names through `nft`).
    pub(crate) nf_tables: [OnceLock<bool>; 2],
}

impl Runner {
    /// Runs in the agent's own network namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// The network namespace commands run in (`None`: the agent's own).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs every command inside the named network namespace.
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self {
            netns: Some(name.into()),
            nf_tables: Default::default(),
        }
    }

    /// `program`, to run in the runner's network namespace.
    pub(crate) fn command(&self, program: &str) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
        }
    }
}

/// The tool of `family`: `iptables-restore` or `ip6tables-restore`.
pub(crate) fn tool(family: Family, base: &str) -> String {
    match family {
        Family::V4 => base.to_owned(),
        Family::V6 => base.replacen("ip", "ip6", 1),
    }
}

/// Runs `cmd`, feeding it `stdin`; a failure carries what the tool said,
/// with the input line it named.
pub(crate) fn run(mut cmd: Command, stdin: Option<&str>) -> Result<Output> {
    let command = format!("{cmd:?}").replace('"', "");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means the tool exited early; its status tells why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| RunError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if let Some(text) = stdin
        && let Some(n) = failed_line(&stderr)
        && let Some(line) = text.lines().nth(n.saturating_sub(1))
    {
        stderr.push_str(&format!(" (line {n}: {line})"));
    }
    Err(RunError::Failed {
        command,
        status: out.status,
        stderr,
    })
}

/// The input line iptables-restore names in `line N failed`.
fn failed_line(stderr: &str) -> Option<usize> {
    let at = stderr.find("line ")?;
    stderr[at + 5..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl Runner {
    /// `sysctl -w KEY=VALUE` (in the runner's network namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        // Read first: where /proc/sys is read-only (a container given the
        // setting by its runtime, as compose `sysctls:` does) a write fails
        // even when the value is already right.
        let mut read = self.command("sysctl");
        read.args(["-n", key]);
        if let Ok(out) = run(read, None)
            && String::from_utf8_lossy(&out.stdout).trim() == value
        {
            return Ok(());
        }
        let mut cmd = self.command("sysctl");
        cmd.args(["-q", "-w", &format!("{key}={value}")]);
        run(cmd, None).map(|_| ())
    }

    /// Whether the family's tools work here (ip6tables may be missing or IPv6 disabled).
    pub fn available(&self, family: Family) -> bool {
        let mut cmd = self.command(&tool(family, "iptables"));
        cmd.args(["-w", "5", "-t", "nat", "-S", "POSTROUTING"]);
        run(cmd, None).is_ok()
    }

    /// The conntrack table of the runner's network namespace.
    pub fn conntrack(&self) -> Conntrack {
        match &self.netns {
            None => Conntrack::host(),
            Some(ns) => Conntrack::in_netns(ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert_eq!(tool(Family::V4, "iptables-restore"), "iptables-restore");
        assert_eq!(tool(Family::V6, "iptables-restore"), "ip6tables-restore");
        assert_eq!(tool(Family::V6, "iptables-save"), "ip6tables-save");
    }

    #[test]
    fn failed_line_is_found() {
        assert_eq!(failed_line("iptables-restore: line 7 failed"), Some(7));
        assert_eq!(failed_line("Bad argument"), None);
    }
}
