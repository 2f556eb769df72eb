//! Data planes: what the agent does with a state.
//!
//! The agent calls [`DataPlane::apply`] with the complete new state and what
//! changed; only when it returns `Ok` is the state persisted and ACKed. A
//! data plane that fails must leave the previous state in force (iptables
//! does so with one `iptables-restore` transaction). `none` only records.
//!
//! ```text
//!  dataplane ── DataPlane, Transactional, Change, ApplyError
//!   ├ node      Family, NodeConfig: what every plane is told about the node
//!   ├ runner    Runner: every command, in the agent's namespace or another
//!   ├ cleanup   a plane starting removes the other planes' rules
//!   └ none      NoneDataPlane: records, programs nothing
//!  crate::iptables, crate::nftables: the kernel planes, each using only
//!  this module (and crate::endpoints' backend-neutral plans), never each other
//! ```

pub mod cleanup;
#[cfg(test)]
pub(crate) mod fixtures;
mod node;
mod none;
pub mod runner;

use std::sync::Arc;

use crate::config::DataPlaneKind;
use crate::state::{AgentState, ChangeSet};
use crate::status::Metrics;

pub use node::{Family, NodeConfig};
pub use none::{NoneDataPlane, RECORDED_VERSIONS, Recorded};
pub use runner::Runner;

/// Why a data plane could not put a state in force. Either way the previous
/// state stays in force; the agent NACKs and retries with backoff (a held
/// xtables lock or a kernel that refused one transaction may pass later).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A command the data plane runs failed or could not be started.
    #[error("programming the node failed")]
    Command(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The data plane refused the state itself (what and why).
    #[error("{0}")]
    Refused(String),
}

impl From<runner::RunError> for ApplyError {
    fn from(e: runner::RunError) -> Self {
        Self::Command(Box::new(e))
    }
}

/// One application of a state.
#[derive(Debug)]
pub struct Change<'a> {
    /// The complete state to put in force.
    pub state: &'a AgentState,
    /// What differs from the state last applied (everything on a full sync).
    pub changes: &'a ChangeSet,
    /// True at start-up and after errors: the data plane should not trust
    /// what it programmed before.
    pub full: bool,
}

/// What the kernel data planes (iptables, nftables) share: each puts a
/// state in force as one transaction, in full or for what changed, and
/// keeps the last state that went in to put back in full when one fails.
pub(crate) trait Transactional {
    /// For logs: `iptables`, `nftables`.
    const NAME: &'static str;

    /// Which plane this is (the others' rules are removed at its first
    /// full sync).
    const KIND: DataPlaneKind;

    /// One transaction of the whole state.
    fn full_sync(&mut self, state: &AgentState) -> Result<(), ApplyError>;

    /// One transaction of what `change` changed.
    fn partial_sync(&mut self, change: &Change<'_>) -> Result<(), ApplyError>;

    /// Whether the next sync must be a full one, and the last state that
    /// went in.
    fn record(&mut self) -> (&mut bool, &mut Option<AgentState>);

    /// The runner of the namespace the plane programs.
    fn runner(&self) -> &Runner;

    /// Whether the other planes' rules were removed since start.
    fn others_removed(&mut self) -> &mut bool;

    /// A full sync, after removing the other planes' rules once per start
    /// ([`cleanup::others`]).
    fn full(&mut self, state: &AgentState) -> Result<(), ApplyError> {
        if !*self.others_removed() {
            let done = cleanup::others(Self::KIND, self.runner());
            *self.others_removed() = done;
        }
        self.full_sync(state)
    }

    /// A full sync of the last state that went in, if there is one.
    fn resync(&mut self) -> Result<(), ApplyError> {
        match self.record().1.take() {
            Some(state) => {
                let r = self.full(&state);
                *self.record().1 = Some(state);
                r
            }
            None => Ok(()),
        }
    }

    /// [`DataPlane::apply`] for a transactional data plane.
    fn apply_transaction(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let result = if change.full || *self.record().0 {
            self.full(change.state)
        } else {
            self.partial_sync(change)
        };
        match result {
            Ok(()) => {
                // A pointer copy: states are persistent maps.
                *self.record().1 = Some(change.state.clone());
                Ok(())
            }
            Err(e) => {
                // The refused transaction changed nothing in the kernel, but
                // our record may have moved: put the last good state back in
                // full.
                tracing::warn!(
                    "{} sync failed: {e}; resyncing the last good state",
                    Self::NAME
                );
                *self.record().0 = true;
                if let Err(again) = self.resync() {
                    tracing::error!("full resync failed too: {again}");
                }
                Err(e)
            }
        }
    }
}

/// Programs a node from a state.
pub trait DataPlane: Send + 'static {
    /// Short name for logs and `/status` (`none`, `iptables`).
    fn name(&self) -> &'static str;

    /// Puts `change.state` in force, or fails leaving the previous one.
    /// Called from a blocking thread: it may run commands.
    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError>;

    /// Called every sync period on a blocking thread: check that what was
    /// programmed is still there (a canary) and repair it from the last
    /// state applied. Default: nothing to check.
    fn maintain(&mut self) -> Result<(), ApplyError> {
        Ok(())
    }

    /// Gives the data plane the agent's metrics to report into.
    fn attach_metrics(&mut self, _metrics: Arc<Metrics>) {}

    /// This node's topology zone changed (learnt from the control plane);
    /// the next apply is a full one. Default: zones do not matter.
    fn set_zone(&mut self, _zone: Option<String>) {}

    /// What this data plane put in force for the resource `name`
    /// (`cluster/namespace/name`), for `/status?service=`; `None` when it
    /// holds nothing for it.
    fn describe(&self, _name: &str) -> Option<serde_json::Value> {
        None
    }

    /// The data plane's own record, for `/status` (`none` shows what it
    /// was given); `None` when it keeps none.
    fn record(&self) -> Option<serde_json::Value> {
        None
    }
}
