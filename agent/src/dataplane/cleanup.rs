//! Starting one kernel data plane removes what the other left on the node,
//! as kube-proxy removes the other mode's rules: a large iptables-nft table
//! would slow every nftables commit, and two sets of rules for the same
//! Service addresses would disagree. The planes know nothing of each other;
//! this module is the one place that knows them all.

use crate::config::DataPlaneKind;

use super::Runner;

/// Removes the rules of every kernel data plane but `keep` from the
/// runner's network namespace. `true` once done (nothing of theirs is
/// left, or none could exist there); a failure is logged and `false`
/// makes the caller try again at its next full sync.
pub fn others(keep: DataPlaneKind, runner: &Runner) -> bool {
    let mut done = true;
    if keep != DataPlaneKind::Iptables
        && let Err(e) = crate::iptables::cleanup(runner)
    {
        tracing::warn!("removing the iptables data plane's rules: {e}");
        done = false;
    }
    if keep != DataPlaneKind::Nftables {
        done &= nftables(runner);
    }
    done
}

/// Removes the nftables data plane's tables. Without libnftables none of
/// them can exist.
fn nftables(runner: &Runner) -> bool {
    use crate::nftables::kernel::Kernel;
    let kernel = match runner.netns() {
        None => Kernel::host(),
        Some(ns) => Kernel::in_netns(ns),
    };
    match kernel {
        Ok(mut kernel) => match crate::nftables::cleanup(&mut kernel) {
            Ok(tables) => {
                if tables > 0 {
                    tracing::info!(tables, "removed the nftables data plane's tables");
                }
                true
            }
            Err(e) => {
                tracing::warn!("removing the nftables data plane's tables: {e}");
                false
            }
        },
        Err(e) => {
            tracing::debug!("no nftables tables to remove: {e}");
            true
        }
    }
}
