//! The iptables plane's commands, added to the shared
//! [`Runner`]: `iptables-restore --noflush`, `nft list chains` and
//! `iptables-save`, and the canary check, for both families. Every command
//! line this plane runs is produced here.

use super::rules::{BUILTIN_JUMPS, CANARY, Table};
use super::sync::Existing;
use crate::dataplane::runner::{Result, RunError, run, tool};
use crate::dataplane::{Family, Runner};

fn nft_family(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
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
}
