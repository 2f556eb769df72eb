//! Restarts and upgrades with no DNS gap: a new agent takes the running
//! agent's listening sockets and state directory over a Unix socket in the
//! state directory, in whichever order the two were started.
//!
//! ```text
//!  successor (starting)                          predecessor (serving)
//!   connect <state-dir>/handoff.sock ──TAKE────▶ stops following the control plane and
//!                                                maintaining the rules; closes the store
//!                                   ◀──sockets── its listening sockets (DNS UDP and TCP, admin,
//!                                                metrics, health) over SCM_RIGHTS, with what each is
//!   opens the store, restores the rules, builds
//!   the DNS index, serves on those sockets
//!                                   ──SERVING──▶ stops reading them, finishes the queries it
//!                                                forwarded, then exits (SIGTERM already seen)
//!                                                or idles until SIGTERM (a DaemonSet's surge)
//! ```
//!
//! Both agents hold the very same sockets from the moment they are sent:
//! a datagram is read by one of them, and whichever reads it answers it.
//! Nothing queued in a socket is lost, as it would be if the new agent
//! bound sockets of its own (with `SO_REUSEPORT`, the kernel drops what
//! waits in a closing socket's queue). The NOTRACK rules and addresses of
//! the DNS stub stay in place throughout. Upgrading NodeLocal DNSCache
//! costs about 20 s of DNS per node (kubernetes/dns#310); an agent that
//! gets SIGTERM waits `--handoff-wait` for a successor before it stops on
//! its own.
//!
//! The socket file is the owner's only (mode 0600 in the state directory),
//! and a peer of another user is refused (`SO_PEERCRED`).
//!
//! Every listening socket an agent serves is also kept, duplicated, in a
//! [`Registry`]. The predecessor's work is two cancellation scopes: asked to
//! take over, it cancels `following` (the stream, the rules' upkeep, the
//! health-check node ports), so its applier and store go, then sends the
//! sockets; told SERVING, it cancels `serving` (its listeners). The
//! successor serves on the very sockets it got (`dns::Sockets`,
//! `serve_kube_proxy_port`; the cluster DNS Service's addresses once its
//! own takeover of them has run once). One that handed over exits at
//! SIGTERM without handing the cluster DNS Service's addresses back (its
//! successor serves them); one whose successor died mid-way exits with an
//! error, to start afresh.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// The socket's file name in the state directory.
pub const SOCKET: &str = "handoff.sock";

/// Most sockets one handoff carries (two per DNS address, and three more).
const MAX_FDS: usize = 16;

/// How long a successor waits for the predecessor to release its state.
const TAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a handed-over socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The DNS stub's UDP socket for one address.
    DnsUdp,
    /// The DNS stub's TCP listener for one address.
    DnsTcp,
    /// `--admin-listen`.
    Admin,
    /// `--metrics-listen`.
    Metrics,
    /// `--healthz-bind-address`.
    Healthz,
}

/// One socket: its role, its address, and the descriptor.
type Socket = (Role, SocketAddr, OwnedFd);

/// The handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be used.
    #[error("handoff socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The other side said something we cannot read.
    #[error("handoff socket {path}: {what}")]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The listening sockets an agent would hand to its successor (duplicates
/// of the descriptors it serves on).
#[derive(Debug, Default)]
pub struct Registry {
    sockets: Mutex<Vec<Socket>>,
}

impl Registry {
    /// Keeps a duplicate of `fd`, listening as `role` on `addr`.
    pub fn register(&self, role: Role, addr: SocketAddr, fd: BorrowedFd<'_>) {
        match fd.try_clone_to_owned() {
            Ok(fd) => self.lock().push((role, addr, fd)),
            Err(e) => tracing::warn!(%addr, ?role, "not kept for a successor: {e}"),
        }
    }

    /// Forgets the DNS sockets of `addr` (no longer served).
    pub fn unregister_dns(&self, addr: SocketAddr) {
        self.lock()
            .retain(|(role, a, _)| !(*a == addr && matches!(role, Role::DnsUdp | Role::DnsTcp)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Socket>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sockets inherited from a predecessor, taken one by one as the agent
/// starts; [`Inherited::serving`] then lets the predecessor go.
#[derive(Debug)]
pub struct Inherited {
    sockets: Mutex<Vec<Socket>>,
    conn: Mutex<Option<UnixStream>>,
}

impl Inherited {
    fn take(&self, role: Role, addr: SocketAddr) -> Option<OwnedFd> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let at = sockets.iter().position(|(r, a, _)| {
            *r == role && (*a == addr || (addr.port() == 0 && a.ip() == addr.ip()))
        })?;
        Some(sockets.remove(at).2)
    }

    /// The TCP listener handed over as `role` on `addr`, if one was.
    pub fn tcp(&self, role: Role, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(role, addr).map(std::net::TcpListener::from)
    }

    /// The DNS sockets of `addr` handed over, if both were.
    pub fn dns(&self, addr: SocketAddr) -> Option<(std::net::UdpSocket, std::net::TcpListener)> {
        let udp = self.take(Role::DnsUdp, addr)?;
        let tcp = self.take(Role::DnsTcp, addr)?;
        Some((udp.into(), tcp.into()))
    }

    /// The addresses whose DNS sockets are still unclaimed.
    pub fn dns_addresses(&self) -> Vec<SocketAddr> {
        let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SocketAddr> = sockets
            .iter()
            .filter(|(r, _, _)| *r == Role::DnsUdp)
            .map(|(_, a, _)| *a)
            .collect();
        out.sort();
        out
    }

    /// Tells the predecessor this agent serves: it stops reading the
    /// sockets and goes.
    pub fn serving(&self) {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut conn) = conn
            && let Err(e) = conn.write_all(b"SERVING\n")
        {
            tracing::warn!("telling the previous agent that this one serves: {e}");
        }
    }
}

/// The descriptions sent beside the descriptors, in their order.
#[derive(Debug, Serialize, Deserialize)]
struct Described {
    role: Role,
    addr: SocketAddr,
}

/// Takes over from the agent running on `dir`, if one is: asks it to let
/// go of the state and receives its sockets. `None` when none answers (no
/// socket file, or one left by an agent that died).
pub fn take_over(dir: &Path) -> Result<Option<Inherited>, Error> {
    let path = dir.join(SOCKET);
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(&path)(e)),
    };
    same_user(&conn, &path)?;
    conn.set_read_timeout(Some(TAKE_TIMEOUT))
        .map_err(io(&path))?;
    conn.write_all(b"TAKE\n").map_err(io(&path))?;
    let mut body = vec![0u8; 64 << 10];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &conn,
        &mut [IoSliceMut::new(&mut body)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io(&path)(e.into()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    let described: Vec<Described> =
        serde_json::from_slice(&body[..got.bytes]).map_err(|e| Error::Protocol {
            path: path.clone(),
            what: format!("the list of sockets: {e}"),
        })?;
    if described.len() != fds.len() {
        return Err(Error::Protocol {
            path,
            what: format!("{} sockets named, {} received", described.len(), fds.len()),
        });
    }
    let sockets = described
        .into_iter()
        .zip(fds)
        .map(|(d, fd)| (d.role, d.addr, fd))
        .collect::<Vec<_>>();
    tracing::info!(
        sockets = sockets.len(),
        "took over from the agent running on this state directory"
    );
    Ok(Some(Inherited {
        sockets: Mutex::new(sockets),
        conn: Mutex::new(Some(conn)),
    }))
}

/// Refuses a peer of another user.
fn same_user(conn: &UnixStream, path: &Path) -> Result<(), Error> {
    let peer = rustix::net::sockopt::socket_peercred(conn).map_err(|e| io(path)(e.into()))?;
    let me = rustix::process::geteuid();
    if peer.uid != me {
        return Err(Error::Protocol {
            path: path.to_owned(),
            what: format!("refused a peer of uid {}", peer.uid.as_raw()),
        });
    }
    Ok(())
}

/// The predecessor's side of one handoff, between its steps.
#[derive(Debug)]
pub struct Taking {
    conn: UnixStream,
    path: PathBuf,
}

/// Listens on `dir`'s handoff socket (replacing a file an earlier agent
/// left) for a successor.
pub fn listen(dir: &Path) -> Result<UnixListener, Error> {
    let path = dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
    Ok(listener)
}

/// Waits (blocking) for a successor that asks to take over.
pub fn accept(listener: &UnixListener, dir: &Path) -> Result<Taking, Error> {
    loop {
        let (conn, _) = listener.accept().map_err(io(&dir.join(SOCKET)))?;
        match asked(conn, dir) {
            Ok(taking) => return Ok(taking),
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Reads (blocking) what a connection to the handoff socket asks: a
/// successor of the same user that asks to take over, or an error.
pub fn asked(conn: UnixStream, dir: &Path) -> Result<Taking, Error> {
    let path = dir.join(SOCKET);
    same_user(&conn, &path)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io(&path))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(io(&path))?;
    if line.trim() != "TAKE" {
        return Err(Error::Protocol {
            path,
            what: "a connection that did not ask to take over".into(),
        });
    }
    conn.set_read_timeout(None).map_err(io(&path))?;
    Ok(Taking { conn, path })
}

/// Where an agent stands with respect to a successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving; no successor asked.
    Serving,
    /// A successor asked: this agent stopped following the control plane
    /// and is handing its sockets over.
    Taking,
    /// The successor serves: this agent holds nothing any more.
    HandedOver,
    /// The successor went away during the handoff: this agent no longer
    /// follows the control plane and should exit.
    Failed,
}

/// What the predecessor's side of a handoff stops and waits for.
#[derive(Debug)]
pub struct Offer {
    /// The state directory (and so the socket).
    pub dir: PathBuf,
    /// The sockets to hand over.
    pub registry: std::sync::Arc<Registry>,
    /// Cancelled when a successor asks: the stream client, the rules'
    /// maintenance and the health-check servers stop.
    pub following: tokio_util::sync::CancellationToken,
    /// Fires when the stream client has stopped (and the store with it).
    pub released: tokio::sync::oneshot::Receiver<()>,
    /// Cancelled once the successor serves: this agent stops reading its
    /// sockets.
    pub serving: tokio_util::sync::CancellationToken,
    /// Where it stands.
    pub phase: tokio::sync::watch::Sender<Phase>,
}

/// The predecessor's side: waits for a successor on the handoff socket
/// (until `shutdown`), then lets go of everything in order (see the module
/// docs).
pub async fn offer(o: Offer, shutdown: tokio_util::sync::CancellationToken) {
    let path = o.dir.join(SOCKET);
    let listener = match listen(&o.dir).and_then(|l| {
        l.set_nonblocking(true).map_err(io(&path))?;
        tokio::net::UnixListener::from_std(l).map_err(io(&path))
    }) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("no successor can take over without a gap: {e}");
            return;
        }
    };
    let taking = loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => return,
        };
        let Ok(conn) = conn.and_then(|(c, _)| c.into_std()) else {
            continue;
        };
        let dir = o.dir.clone();
        let asked = tokio::task::spawn_blocking(move || {
            conn.set_nonblocking(false).map_err(io(&dir.join(SOCKET)))?;
            asked(conn, &dir)
        })
        .await;
        match asked {
            Ok(Ok(t)) => break t,
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::warn!("handoff: {e}"),
        }
    };
    tracing::info!("a successor asks to take over: letting go of the control plane and the state");
    o.phase.send_replace(Phase::Taking);
    o.following.cancel();
    if tokio::time::timeout(TAKE_TIMEOUT, o.released)
        .await
        .is_err()
    {
        tracing::warn!("the stream client did not stop within {TAKE_TIMEOUT:?}");
    }
    let registry = o.registry.clone();
    let handed = tokio::task::spawn_blocking(move || {
        let sent = taking.send(&registry)?;
        tracing::info!(
            sockets = sent,
            "sockets handed to the successor; serving until it does"
        );
        Ok::<bool, Error>(taking.wait_serving())
    })
    .await;
    match handed {
        Ok(Ok(true)) => {
            tracing::info!("the successor serves: this agent stops serving");
            o.serving.cancel();
            o.phase.send_replace(Phase::HandedOver);
        }
        Ok(Ok(false)) => {
            tracing::error!("the successor went away before it served");
            o.phase.send_replace(Phase::Failed);
        }
        Ok(Err(e)) => {
            tracing::error!("handing over: {e}");
            o.phase.send_replace(Phase::Failed);
        }
        Err(e) => {
            tracing::error!("handing over: {e}");
            o.phase.send_replace(Phase::Failed);
        }
    }
}

impl Taking {
    /// Sends `registry`'s sockets to the successor.
    pub fn send(&self, registry: &Registry) -> Result<usize, Error> {
        let sockets = registry.lock();
        let sockets = &sockets[..sockets.len().min(MAX_FDS)];
        let described: Vec<Described> = sockets
            .iter()
            .map(|(role, addr, _)| Described {
                role: *role,
                addr: *addr,
            })
            .collect();
        let body = serde_json::to_vec(&described).map_err(|e| Error::Protocol {
            path: self.path.clone(),
            what: e.to_string(),
        })?;
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, _, fd)| fd.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(Error::Protocol {
                path: self.path.clone(),
                what: "too many sockets for one message".into(),
            });
        }
        rustix::net::sendmsg(
            &self.conn,
            &[IoSlice::new(&body)],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(|e| io(&self.path)(e.into()))?;
        Ok(fds.len())
    }

    /// Waits (blocking) until the successor serves; `false` when it went
    /// away first.
    pub fn wait_serving(self) -> bool {
        let mut line = String::new();
        BufReader::new(&self.conn).read_line(&mut line).is_ok() && line.trim() == "SERVING"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_go_to_the_successor_with_what_they_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            take_over(dir.path()).expect("no error").is_none(),
            "nobody runs"
        );
        let listener = listen(dir.path()).expect("listens");
        let mode = std::fs::metadata(dir.path().join(SOCKET))
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "owner only");

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let tcp = std::net::TcpListener::bind(udp.local_addr().expect("addr")).expect("tcp");
        let addr = udp.local_addr().expect("addr");
        let admin = std::net::TcpListener::bind("127.0.0.1:0").expect("admin");
        let admin_addr = admin.local_addr().expect("addr");
        let registry = Registry::default();
        registry.register(Role::DnsUdp, addr, udp.as_fd());
        registry.register(Role::DnsTcp, addr, tcp.as_fd());
        registry.register(Role::Admin, admin_addr, admin.as_fd());

        let path = dir.path().to_owned();
        let predecessor = std::thread::spawn(move || {
            let taking = accept(&listener, &path).expect("a successor");
            assert_eq!(taking.send(&registry).expect("sent"), 3);
            taking.wait_serving()
        });
        let inherited = take_over(dir.path())
            .expect("no error")
            .expect("a predecessor");
        assert_eq!(inherited.dns_addresses(), [addr]);
        let (udp2, _tcp2) = inherited.dns(addr).expect("the DNS sockets");
        assert!(inherited.tcp(Role::Admin, admin_addr).is_some());
        assert!(inherited.tcp(Role::Metrics, admin_addr).is_none());
        // The same socket: a datagram sent to it is read through either.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
        client.send_to(b"ping", addr).expect("send");
        let mut buf = [0u8; 8];
        let (n, _) = udp2
            .recv_from(&mut buf)
            .expect("received on the inherited socket");
        assert_eq!(&buf[..n], b"ping");
        inherited.serving();
        assert!(predecessor.join().expect("thread"), "told it serves");
    }
}
