//! Every command line the iptables data plane runs is produced here:
//! `iptables-restore --noflush`, `nft list chains` and `iptables-save`, the
//! canary check and `sysctl`, for both families. The runner also says
//! which network namespace the conntrack table to clean is in.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::rules::{BUILTIN_JUMPS, CANARY, Family, Table};
use super::sync::Existing;
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
    /// Per family, once asked: whether iptables is the nf_tables variant.
    nf_tables: [OnceLock<bool>; 2],
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

    fn command(&self, program: &str) -> Command {
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

fn tool(family: Family, base: &str) -> String {
    match family {
        Family::V4 => base.to_owned(),
        Family::V6 => base.replacen("ip", "ip6", 1),
    }
}

fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Result<Output> {
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
    /// Applies `text` as one transaction, leaving chains it does not name alone.
    pub fn restore(&self, family: Family, text: &str) -> Result<()> {
        let mut cmd = self.command(&tool(family, "iptables-restore"));
        cmd.args(["-w", "5", "--noflush"]);
        run(cmd, Some(text)).map(|_| ())
    }

    /// `iptables-save -t <table>`.
    pub fn save(&self, family: Family, table: Table) -> Result<String> {
        let mut cmd = self.command(&tool(family, "iptables-save"));
        cmd.args(["-t", table.name()]);
        run(cmd, None).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// What of ours the kernel holds in `family`.
    ///
    /// With the nf_tables backend this never lists rules: chain names come
    /// from `nft list chains`, and our jumps from `iptables -S` of the few
    /// built-in chains we jump from. `iptables-save` of a table with
    /// 110,000 chains ran for 80 s and then crashed here (iptables 1.8.9
    /// inserts every chain it reads into a sorted list). With the legacy
    /// backend, or without `nft`, it falls back to `iptables-save`.
    pub fn existing(&self, family: Family) -> Result<Existing> {
        let mut existing = Existing::default();
        if self.nf_tables(family) {
            let mut cmd = self.command("nft");
            cmd.args(["list", "chains", nft_family(family)]);
            match run(cmd, None) {
                Ok(out) => {
                    existing.parse_nft_chains(&String::from_utf8_lossy(&out.stdout));
                    for table in Table::ALL {
                        if self.canary_present(family, table)? {
                            existing.canaries.insert(table);
                        }
                    }
                    let mut seen = Vec::new();
                    for j in BUILTIN_JUMPS {
                        if seen.contains(&(j.table, j.chain)) {
                            continue;
                        }
                        seen.push((j.table, j.chain));
                        let mut cmd = self.command(&tool(family, "iptables"));
                        cmd.args(["-w", "5", "-t", j.table.name(), "-S", j.chain]);
                        let out = run(cmd, None)?;
                        existing.parse(j.table, &String::from_utf8_lossy(&out.stdout));
                    }
                    return Ok(existing);
                }
                Err(e) => {
                    tracing::warn!("nft list chains failed ({e}); reading iptables-save instead");
                }
            }
        }
        for table in Table::ALL {
            existing.parse(table, &self.save(family, table)?);
        }
        Ok(existing)
    }

    /// Whether the family's iptables is the nf_tables variant (asked once).
    fn nf_tables(&self, family: Family) -> bool {
        *self.nf_tables[family as usize].get_or_init(|| {
            let mut cmd = self.command(&tool(family, "iptables"));
            cmd.arg("-V");
            run(cmd, None).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables"))
        })
    }

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

    /// Whether the canary rule is still in `table`; `false` means someone
    /// flushed or deleted our chains.
    pub fn canary_present(&self, family: Family, table: Table) -> Result<bool> {
        let mut cmd = self.command(&tool(family, "iptables"));
        cmd.args(["-w", "5", "-t", table.name(), "-S", CANARY]);
        match run(cmd, None) {
            Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).contains("switchyard canary")),
            Err(RunError::Failed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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
