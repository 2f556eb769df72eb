//! The one way the nftables data plane reaches the kernel: a libnftables
//! context kept open ([`switchyard_libnftables::Nft`]) for the skeleton
//! and the listings of one set or map, and a netlink socket of our own for
//! element batches and for whether our table and its hook are there
//! ([`super::netlink`]), in the agent's own network namespace or, for
//! tests and benchmarks, in a named one.
//!
//! ```text
//!  host:  run(text) ─▶ Nft::run (this thread)      send(batch) ─▶ ElementSocket (this thread)
//!  netns: run(text) ─▶ channel ─▶ worker thread (entered the namespace with setns(2) once) ─▶ Nft::run ─▶ reply
//!         send(batch) ─▶ ElementSocket (opened by the worker, so in the namespace; used from this thread)
//! ```
//!
//! The worker exists because libnftables opens its netlink socket in the
//! namespace of the thread that first uses it; a thread of its own that
//! never leaves the namespace keeps every socket it may reopen there too.
//! Our own socket belongs to the namespace it was created in, wherever it
//! is used from.

use std::path::PathBuf;
use std::sync::mpsc;

use switchyard_libnftables::{Error as NftError, Nft};

use super::netlink::{ElementSocket, NetlinkError, Sealed};
use crate::dataplane::Family;

/// Why the kernel could not be reached or refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// libnftables said no (or could not be loaded).
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The test's network namespace could not be entered.
    #[error("entering network namespace {path}")]
    Namespace {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An element batch could not be sent or was refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The worker thread of a namespace ended.
    #[error("the nftables worker thread of {0} ended")]
    Worker(String),
}

type Job = (String, u32, mpsc::Sender<Result<String, NftError>>);

/// A libnftables context and an element socket in a network namespace.
#[derive(Debug)]
pub struct Kernel {
    nft: Libnft,
    elements: ElementSocket,
}

/// Where libnftables runs.
#[derive(Debug)]
enum Libnft {
    /// In the agent's own namespace.
    Host(Nft),
    /// In a named namespace, through its worker thread.
    Netns {
        /// The namespace's name.
        name: String,
        /// Jobs for the worker: commands, output flags, where to answer.
        jobs: mpsc::Sender<Job>,
    },
}

impl Kernel {
    /// A context in the agent's own network namespace.
    pub fn host() -> Result<Self, KernelError> {
        Ok(Self {
            nft: Libnft::Host(Nft::open()?),
            elements: ElementSocket::open()?,
        })
    }

    /// A context in the named network namespace (`ip netns` names).
    pub fn in_netns(name: &str) -> Result<Self, KernelError> {
        let path = PathBuf::from("/var/run/netns").join(name);
        let ns = std::fs::File::open(&path).map_err(|source| KernelError::Namespace {
            path: path.clone(),
            source,
        })?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("nft-{name}"))
            .spawn(move || {
                let opened = rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| KernelError::Namespace {
                    path,
                    source: e.into(),
                })
                .and_then(|()| Ok((Nft::open()?, ElementSocket::open()?)));
                let mut nft = match opened {
                    Ok((n, socket)) => {
                        let _ = ready_tx.send(Ok(socket));
                        n
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (text, flags, reply) in rx {
                    nft.set_output_flags(flags);
                    let _ = reply.send(nft.run(&text));
                }
            })
            .map_err(|source| KernelError::Namespace {
                path: PathBuf::from(name),
                source,
            })?;
        let elements = ready_rx
            .recv()
            .map_err(|_| KernelError::Worker(name.to_owned()))??;
        Ok(Self {
            nft: Libnft::Netns {
                name: name.to_owned(),
                jobs,
            },
            elements,
        })
    }

    /// Runs `text` as one transaction; what nft printed.
    pub fn run(&mut self, text: &str) -> Result<String, KernelError> {
        self.run_with(text, 0)
    }

    /// Runs `text` with output flags (`switchyard_libnftables::OUTPUT_JSON`).
    pub fn run_with(&mut self, text: &str, flags: u32) -> Result<String, KernelError> {
        match &mut self.nft {
            Libnft::Host(nft) => {
                nft.set_output_flags(flags);
                Ok(nft.run(text)?)
            }
            Libnft::Netns { name, jobs } => {
                let (tx, rx) = mpsc::channel();
                jobs.send((text.to_owned(), flags, tx))
                    .map_err(|_| KernelError::Worker(name.clone()))?;
                Ok(rx.recv().map_err(|_| KernelError::Worker(name.clone()))??)
            }
        }
    }

    /// Sends one element batch: one transaction.
    pub fn send(&mut self, batch: &Sealed) -> Result<(), KernelError> {
        Ok(self.elements.send(batch)?)
    }

    /// Whether table `table` exists in `family` (netlink: libnftables
    /// would fetch every element of every set to say).
    pub fn table_exists(&mut self, family: Family, table: &str) -> Result<bool, KernelError> {
        Ok(self.elements.table_exists(family, table)?)
    }

    /// Whether a rule of `chain` in `table` jumps to `target` (netlink).
    pub fn jumps_to(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        target: &str,
    ) -> Result<bool, KernelError> {
        Ok(self.elements.jumps_to(family, table, chain, target)?)
    }
}
