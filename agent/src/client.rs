//! The stream to the control plane: connect, announce what we hold, apply
//! each update, answer ACK or NACK, and reconnect with jittered exponential
//! backoff when anything breaks. The state in force never depends on the
//! connection: while disconnected, the node keeps serving its last good state.
//!
//! ```text
//!  connect (TCP, TLS with the files in force) ─▶ Hello ─▶ ┌─ update ─▶ apply ─▶ ACK
//!                                                          ├─ update ─▶ apply fails ─▶ NACK
//!                                                          │    transient (data plane, disk)? retry with backoff
//!                                                          │      └▶ applies: reconnect, announcing the new state
//!                                                          └─ stream ends ─▶ backoff ─▶ connect
//! ```
//!
//! With several `--control-plane` URLs the agent streams from one at a
//! time: a stream that fails (a reset, a refusal, or HTTP/2 pings left
//! unanswered for `KEEPALIVE_TIMEOUT`) moves it to the next at once, and
//! the backoff applies once every one has been tried.
//!
//! A retried update that finally applies is not ACKed late on the old
//! stream: the control plane may already have sent the next update computed
//! from the state we NACKed from. The agent reconnects instead, and its
//! Hello announces exactly what it holds (protocol rule 6).
//!
//! Figures: the Hello goes in parts of 1 KiB; reconnect backoff is 200 ms
//! doubling to 10 s ([`Backoff`]), the retry of a transient NACK 0.5 s
//! doubling to 30 s, and a new update supersedes the retry. HTTP/2 pings
//! every 3 s, each answered within 5 s, tell a control plane that stopped
//! answering within 8 s (the control plane pings agents every 4 s within
//! 5 s); a connection that has not finished its HTTP/2 handshake in 10 s
//! is given up (a frozen control plane accepts TCP and never answers). A
//! stream that broke after it was answered is not blamed on TLS or clear
//! text: when our side dropped it (an unanswered ping), `last_error` says
//! the control plane did not answer a ping within 5 s. `/status`
//! `control_plane` names the URL in use. Refused with `RESOURCE_EXHAUSTED`
//! for announcing too much, the agent announces nothing next time and takes
//! the first update as the complete state (protocol rule 10). A URL must
//! name `http://` or `https://`, and `http://` with any TLS flag is
//! refused. The connector is TCP and the rustls handshake with the
//! `ClientConfig` in force (`switchyard_proto::tls`), under tonic's
//! `connect_with_connector`; failures are explained from the rustls error
//! or, once tonic has made it a status, from the TLS alert in its text.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use switchyard_proto::parts::{assemble, feed_hello};
use switchyard_proto::tls::{ClientFiles, ReloadingClient, chain, find_rustls_error};
use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::applier::Applier;
use crate::config::Args;

/// First wait before an update that failed for a local reason is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between two tries of a failing update.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Jittered exponential backoff: each failure doubles the ceiling up to
/// `max`; the wait is drawn from [ceiling/2, ceiling]. Reset only once a
/// response has arrived, so a control plane that accepts and then drops
/// connections is not hammered.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Backoff between `base` and `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            ceiling: base,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the shortest wait.
    pub fn reset(&mut self) {
        self.ceiling = self.base;
    }
}

/// Why `--control-plane` and the TLS flags do not make a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The URL does not parse or names no host.
    #[error(
        "--control-plane {url:?} is not a URL like http://HOST:PORT or https://HOST:PORT: {why}"
    )]
    Url {
        /// The flag's value.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// TLS flags with an `http://` URL: fail closed rather than talk in clear text.
    #[error(
        "--control-plane {url} is http:// (clear text) but {flags} given: use an https:// URL, or drop the TLS flags"
    )]
    ClearTextWithTls {
        /// The flag's value.
        url: String,
        /// The TLS flags present.
        flags: String,
    },
    /// An `https://` URL without a CA to check the server against.
    #[error(
        "--control-plane {url} is https:// but --tls-ca is missing: give the CA that signed the control plane's certificate"
    )]
    NoCa {
        /// The flag's value.
        url: String,
    },
    /// The TLS files do not load.
    #[error("TLS configuration")]
    Tls(#[source] switchyard_proto::tls::TlsError),
}

/// HTTP/2 pings on the stream's connection: a control plane that stops
/// answering (gone, frozen, or behind a blackhole, where no reset ever
/// comes) is noticed within the interval plus the timeout, 8 s, and the
/// agent moves on to the next `--control-plane`. (10 s + 20 s before: a
/// dead control plane went unnoticed for 30-36 s.)
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may take, TCP, TLS and the HTTP/2 handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the control planes (`--control-plane`, one or several):
/// the agent streams from one at a time and moves to the next when its
/// stream fails.
#[derive(Debug, Clone)]
pub struct Connector {
    targets: Vec<Target>,
}

/// How to reach one control plane.
#[derive(Debug, Clone)]
struct Target {
    /// The URL as given.
    url: String,
    endpoint: Endpoint,
    /// `host:port` to dial.
    address: String,
    tls: Option<ClientTls>,
}

#[derive(Debug, Clone)]
struct ClientTls {
    config: Arc<ReloadingClient>,
    /// Whether we present a client certificate.
    identity: bool,
    server_name: rustls::pki_types::ServerName<'static>,
    ca: std::path::PathBuf,
}

impl Connector {
    /// Checks each URL against the TLS flags and loads the TLS files.
    pub fn from_args(args: &Args) -> Result<Self, ConnectorError> {
        let targets = args
            .control_plane
            .iter()
            .map(|url| Target::new(url, args))
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ConnectorError::Url {
                url: String::new(),
                why: "no URL given".into(),
            });
        }
        Ok(Self { targets })
    }
}

impl Target {
    /// `url`, checked against the TLS flags of `args`.
    fn new(url: &str, args: &Args) -> Result<Self, ConnectorError> {
        let url = url.to_owned();
        let bad = |why: &str| ConnectorError::Url {
            url: url.clone(),
            why: why.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(other) => {
                return Err(bad(&format!(
                    "the scheme {other:?} is neither http nor https"
                )));
            }
            None => return Err(bad("it has no scheme (http:// or https://)")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("it names no host"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let address = format!("{host}:{port}");
        let tls_flags: Vec<&str> = [
            (args.tls_ca.is_some(), "--tls-ca"),
            (args.tls_cert.is_some(), "--tls-cert"),
            (args.tls_key.is_some(), "--tls-key"),
            (args.tls_server_name.is_some(), "--tls-server-name"),
        ]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect();
        if !https && !tls_flags.is_empty() {
            return Err(ConnectorError::ClearTextWithTls {
                url,
                flags: if tls_flags.len() == 1 {
                    format!("{} is", tls_flags[0])
                } else {
                    format!("{} are", tls_flags.join(", "))
                },
            });
        }
        let tls = if https {
            let ca = args
                .tls_ca
                .clone()
                .ok_or_else(|| ConnectorError::NoCa { url: url.clone() })?;
            let files = ClientFiles {
                ca: ca.clone(),
                identity: args.tls_cert.clone().zip(args.tls_key.clone()),
            };
            let name = args.tls_server_name.clone().unwrap_or_else(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            });
            let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|e| bad(&format!("{name:?} is not a TLS server name: {e}")))?;
            Some(ClientTls {
                identity: files.identity.is_some(),
                config: Arc::new(ReloadingClient::client(files).map_err(ConnectorError::Tls)?),
                server_name,
                ca,
            })
        } else {
            None
        };
        // tonic only carries HTTP/2 here; TCP and TLS are ours (below), so
        // that each connection uses the certificate files in force.
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| bad(&e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(Self {
            url,
            endpoint,
            address,
            tls,
        })
    }

    fn security(&self) -> Security {
        match &self.tls {
            None => Security::Plain,
            Some(t) => Security::Tls {
                identity: t.identity,
            },
        }
    }

    async fn connect(&self) -> Result<Channel, String> {
        let Some(tls) = &self.tls else {
            return self.endpoint.connect().await.map_err(|e| {
                format!(
                    "connecting to {} (clear text): {}",
                    self.address,
                    explain(&e, Security::Plain)
                )
            });
        };
        let tls = tls.clone();
        let address = self.address.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            let address = address.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let _ = tcp.set_nodelay(true);
                let connector = tokio_rustls::TlsConnector::from(tls.config.current());
                match connector.connect(tls.server_name.clone(), tcp).await {
                    Ok(stream) => Ok(hyper_util::rt::TokioIo::new(stream)),
                    Err(e) => Err(std::io::Error::other(HandshakeFailed(explain_tls(
                        &e,
                        &tls.ca,
                        &tls.server_name,
                    )))),
                }
            }
        });
        self.endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                format!(
                    "connecting to {} (TLS): {}",
                    self.address,
                    explain(&e, self.security())
                )
            })
    }
}

/// A TLS handshake that failed, said in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct HandshakeFailed(String);

/// The TLS cause of a handshake failure, naming what to check.
fn explain_tls(
    e: &std::io::Error,
    ca: &std::path::Path,
    server_name: &rustls::pki_types::ServerName<'_>,
) -> String {
    match find_rustls_error(e) {
        Some(r) => explain_rustls(r, Some(ca), Some(server_name)),
        None => format!("TLS handshake failed: {}", chain(e)),
    }
}

fn explain_rustls(
    e: &rustls::Error,
    ca: Option<&std::path::Path>,
    server_name: Option<&rustls::pki_types::ServerName<'_>>,
) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let ca = ca.map_or_else(
        || "--tls-ca".to_owned(),
        |p| format!("--tls-ca {}", p.display()),
    );
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "the control plane's certificate is not signed by a CA in {ca} (unknown issuer)"
        ),
        E::InvalidCertificate(C::BadSignature) => format!(
            "the control plane's certificate is not signed by a CA in {ca} (a CA of the same name \
             is there, but its key did not sign it)"
        ),
        E::InvalidCertificate(C::NotValidForName) => format!(
            "the control plane's certificate is not valid for the name {:?}: connect by a name it holds, or set --tls-server-name",
            server_name.map(|n| n.to_str().into_owned()).unwrap_or_default()
        ),
        E::InvalidCertificate(C::NotValidForNameContext { expected, presented }) => format!(
            "the control plane's certificate is not valid for the name {:?}; it holds {}: connect by one of those names, or set --tls-server-name",
            expected.to_str(),
            presented.join(", ")
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the control plane's certificate has expired".to_owned()
        }
        E::InvalidCertificate(other) => {
            format!("the control plane's certificate was refused: {other:?}")
        }
        E::InvalidMessage(_) => "the control plane did not answer in TLS (is it serving clear text? then use an http:// URL, or give it --tls-cert and --tls-key)"
            .to_owned(),
        E::AlertReceived(A::CertificateRequired) => "the control plane requires a client certificate (mutual TLS): give --tls-cert and --tls-key"
            .to_owned(),
        E::AlertReceived(
            alert @ (A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::AccessDenied
            | A::DecryptError),
        ) => format!(
            "the control plane refused our client certificate ({alert:?}): it must be signed by the              CA the control plane's --tls-client-ca names"
        ),
        E::AlertReceived(A::CertificateExpired) => {
            "the control plane refused our client certificate: it has expired".to_owned()
        }
        other => format!("TLS: {other}"),
    }
}

/// What kind of connection an error happened on, for the hint it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    /// Clear text.
    Plain,
    /// TLS, with or without a client certificate.
    Tls { identity: bool },
}

/// Whether a transport error's text says the connection just went away.
fn closed_early(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    [
        "connection reset",
        "broken pipe",
        "frame with invalid size",
        "connection closed",
        "unexpected end of file",
        "protocol error",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// A transport error said in words: the TLS cause when there is one, a hint
/// at what closes connections when it just closed.
fn explain(e: &(dyn std::error::Error + 'static), security: Security) -> String {
    if let Some(r) = find_rustls_error(e) {
        return explain_rustls(r, None, None);
    }
    with_hint(chain(e), security)
}

fn with_hint(text: String, security: Security) -> String {
    if !closed_early(&text) {
        return text;
    }
    match security {
        Security::Plain => format!(
            "{text} (the connection closed during the HTTP/2 handshake, as a TLS server does to \
             clear text: if the control plane serves TLS, use an https:// URL with --tls-ca)"
        ),
        // A TLS 1.3 server checks the client certificate after the client
        // has finished; its alert can be lost when the connection closes.
        Security::Tls { identity: false } => format!(
            "{text} (the control plane closed the connection after the TLS handshake: it may \
             require a client certificate (mutual TLS): give --tls-cert and --tls-key)"
        ),
        Security::Tls { identity: true } => format!(
            "{text} (the control plane closed the connection after the TLS handshake: it may have \
             refused our client certificate: it must be signed by the CA its --tls-client-ca names)"
        ),
    }
}

/// A stream that broke after the control plane answered it, said in
/// words: TLS and clear text were fine then, so no hint about them. The
/// only reason our side drops a connection under a live stream (h2 then
/// says "stream closed because of a broken pipe") is a ping left unanswered: the control plane
/// stopped answering (gone, frozen, or behind a blackhole).
fn explain_broken(s: &tonic::Status, security: Security) -> String {
    let cause = std::error::Error::source(s)
        .map(|src| format!(" ({})", chain(src)))
        .unwrap_or_default();
    let text = format!("{:?}: {}{cause}", s.code(), s.message());
    let lower = text.to_ascii_lowercase();
    if lower.contains("keep-alive timed out")
        || lower.contains("stream closed because of a broken pipe")
    {
        return format!(
            "{text}: the control plane did not answer an HTTP/2 ping within \
             {KEEPALIVE_TIMEOUT:?} (it is gone, frozen or unreachable)"
        );
    }
    if security == Security::Plain || !closed_early(&text) {
        return text;
    }
    explain_status(s, security)
}

/// A refused or broken stream said in words.
fn explain_status(s: &tonic::Status, security: Security) -> String {
    if let Some(r) = std::error::Error::source(s).and_then(find_rustls_error) {
        return explain_rustls(r, None, None);
    }
    let cause = std::error::Error::source(s)
        .map(|src| format!(" ({})", chain(src)))
        .unwrap_or_default();
    let text = format!("{:?}: {}{cause}", s.code(), s.message());
    // Once tonic has turned a transport error into a status, the rustls
    // error is only text: a TLS 1.3 server refuses a client certificate
    // after the client finished its handshake, so this is where it shows.
    match alert_in(&text) {
        Some(alert) => explain_rustls(&rustls::Error::AlertReceived(alert), None, None),
        None => with_hint(text, security),
    }
}

/// The TLS alert a transport error's text reports (`received fatal alert: X`).
fn alert_in(text: &str) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    let name = text.split("received fatal alert: ").nth(1)?;
    let name: String = name
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    [
        A::CertificateRequired,
        A::UnknownCA,
        A::BadCertificate,
        A::CertificateUnknown,
        A::CertificateExpired,
        A::AccessDenied,
        A::DecryptError,
    ]
    .into_iter()
    .find(|a| format!("{a:?}") == name)
}

/// Who this agent is, as announced in its Hello.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Node name.
    pub node: String,
    /// Cluster id.
    pub cluster: String,
    /// Zone, possibly empty.
    pub zone: String,
}

/// Runs until `shutdown`: one stream at a time, reconnecting with backoff.
/// With several control planes, a stream that fails or ends moves the
/// agent to the next one at once; the backoff applies once every one has
/// been tried.
pub async fn run(
    connector: Connector,
    who: NodeIdentity,
    mut applier: Applier,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut announce_held = true;
    let targets = &connector.targets;
    let mut at = 0;
    loop {
        let target = &targets[at];
        applier.metrics.connects.inc();
        applier
            .status
            .update(|s| s.control_plane = Some(target.url.clone()));
        let result = tokio::select! {
            r = session(target, &who, &mut applier, &mut backoff, &mut announce_held) => r,
            _ = shutdown.cancelled() => return,
        };
        applier.metrics.connected.set(0);
        let failed_over = |at: &mut usize| {
            *at = (*at + 1) % targets.len();
            *at != 0
        };
        let wait = match result {
            Ok(SessionEnd::Closed) => {
                applier.status.update(|s| s.connected = false);
                tracing::info!(control_plane = %target.url, "control plane closed the stream; reconnecting");
                if failed_over(&mut at) {
                    Duration::ZERO
                } else {
                    backoff.next_wait()
                }
            }
            Ok(SessionEnd::Resume) => {
                applier.status.update(|s| s.connected = false);
                tracing::info!("a retried update applied; reconnecting to announce it");
                Duration::ZERO
            }
            Err(e) => {
                tracing::warn!(control_plane = %target.url, "stream to the control plane failed: {e}");
                // One update: whoever sees the stream down sees why.
                applier.status.update(|s| {
                    s.connected = false;
                    s.last_error = Some(e);
                });
                if failed_over(&mut at) {
                    Duration::ZERO
                } else {
                    backoff.next_wait()
                }
            }
        };
        tracing::debug!(?wait, next = %targets[at].url, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// How a stream ended without an error.
enum SessionEnd {
    /// The control plane closed it.
    Closed,
    /// An update NACKed for a local reason applied on a later try: the
    /// agent reconnects at once to announce the state it now holds.
    Resume,
}

/// An update being tried again after a local failure.
struct Retry {
    update: v1::SnapshotUpdate,
    backoff: Backoff,
    at: tokio::time::Instant,
}

async fn session(
    connector: &Target,
    who: &NodeIdentity,
    applier: &mut Applier,
    backoff: &mut Backoff,
    announce_held: &mut bool,
) -> Result<SessionEnd, String> {
    let tls = connector.security();
    // A control plane that accepts TCP but never speaks HTTP/2 (frozen)
    // would hold the handshake for ever: pings start only after it.
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect())
        .await
        .map_err(|_| {
            format!(
                "connecting to {}: no HTTP/2 handshake within {CONNECT_TIMEOUT:?}",
                connector.address
            )
        })??;
    let mut client = SnapshotDiscoveryClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    let state = applier.state();
    let announced = if *announce_held {
        state.versions()
    } else {
        Default::default()
    };
    let mut replacing = announced.is_empty() && !state.resources.is_empty();
    feed_hello(&hello(who, &state.version), announced, tx.clone());
    drop(state);
    let mut inbound = match client.stream_snapshots(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if s.code() == tonic::Code::ResourceExhausted
                && s.message().contains("initial_resource_versions")
            {
                // Too much held for this control plane's view: ask for the
                // complete state next time (protocol rule 11).
                *announce_held = false;
            }
            return Err(format!(
                "control plane refused the stream: {}",
                explain_status(&s, tls)
            ));
        }
    };
    *announce_held = true;
    applier.status.update(|s| s.connected = true);
    applier.metrics.connected.set(1);
    tracing::info!(node = %who.node, "connected to the control plane");
    let mut assembling: Option<v1::SnapshotUpdate> = None;
    let mut retry: Option<Retry> = None;
    loop {
        let retry_at = retry.as_ref().map(|r| r.at);
        let part = tokio::select! {
            part = inbound.message() => part.map_err(|s| explain_broken(&s, tls))?,
            () = sleep_until(retry_at), if retry_at.is_some() => {
                let Some(mut r) = retry.take() else { continue };
                match applier.apply_update(&r.update).await {
                    Ok(()) => {
                        tracing::info!(version = %r.update.snapshot_version, "the retried update applied");
                        return Ok(SessionEnd::Resume);
                    }
                    Err(e) if e.is_transient() => {
                        let wait = r.backoff.next_wait();
                        tracing::warn!(?wait, "the update still does not apply: {}", e.nack_detail());
                        r.at = tokio::time::Instant::now() + wait;
                        retry = Some(r);
                    }
                    Err(_) => {}
                }
                continue;
            }
        };
        let Some(part) = part else {
            return Ok(SessionEnd::Closed);
        };
        backoff.reset();
        let Some(update) = assemble(&mut assembling, part) else {
            continue;
        };
        // A new update supersedes one being retried: it is computed from the
        // state we hold (the last one we ACKed).
        retry = None;
        let update = if std::mem::take(&mut replacing) {
            applier.as_complete_state(&update)
        } else {
            update
        };
        let reply = match applier.apply_update(&update).await {
            Ok(()) => agent_message::Kind::Ack(v1::Ack {
                nonce: update.nonce.clone(),
                snapshot_version: update.snapshot_version.clone(),
            }),
            Err(e) => {
                let nack = agent_message::Kind::Nack(v1::Nack {
                    nonce: update.nonce.clone(),
                    snapshot_version: update.snapshot_version.clone(),
                    error_detail: e.nack_detail(),
                });
                if e.is_transient() {
                    let mut b = Backoff::new(RETRY_FIRST, RETRY_MAX);
                    let wait = b.next_wait();
                    retry = Some(Retry {
                        update,
                        backoff: b,
                        at: tokio::time::Instant::now() + wait,
                    });
                }
                nack
            }
        };
        tx.send(v1::AgentMessage { kind: Some(reply) })
            .await
            .map_err(|_| "stream closed")?;
    }
}

/// This node's Hello (protocol rule 9 splits it into parts).
fn hello(who: &NodeIdentity, snapshot_version: &str) -> v1::Hello {
    v1::Hello {
        node_name: who.node.clone(),
        cluster_id: who.cluster.clone(),
        zone: who.zone.clone(),
        snapshot_version: snapshot_version.to_owned(),
        role: v1::Role::Agent as i32,
        ..Default::default()
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["switchyard-agent"];
        argv.extend_from_slice(extra);
        <Args as clap::Parser>::parse_from(argv)
    }

    #[test]
    fn urls_and_tls_flags_fail_closed() {
        let e = Connector::from_args(&args(&["--control-plane", "127.0.0.1:18000"]))
            .expect_err("no scheme");
        assert!(
            e.to_string().contains("no scheme (http:// or https://)"),
            "{e}"
        );
        let e = Connector::from_args(&args(&[
            "--control-plane",
            "http://cp:18000",
            "--tls-ca",
            "/etc/ca.pem",
        ]))
        .expect_err("clear text with a CA");
        assert!(
            e.to_string()
                .contains("http:// (clear text) but --tls-ca is given"),
            "{e}"
        );
        let e = Connector::from_args(&args(&[
            "--control-plane",
            "http://cp:18000",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ]))
        .expect_err("clear text with a client certificate");
        assert!(
            e.to_string().contains("--tls-cert, --tls-key are given"),
            "{e}"
        );
        let e = Connector::from_args(&args(&["--control-plane", "https://cp:18000"]))
            .expect_err("https without a CA");
        assert!(e.to_string().contains("--tls-ca is missing"), "{e}");
        let e = Connector::from_args(&args(&["--control-plane", "ftp://cp:18000"]))
            .expect_err("another scheme");
        assert!(e.to_string().contains("neither http nor https"), "{e}");
        Connector::from_args(&args(&["--control-plane", "http://127.0.0.1:18000"]))
            .expect("plain http without TLS flags");
    }

    #[test]
    fn alerts_are_read_from_transport_text() {
        assert_eq!(
            alert_in(
                "transport error: connection error: received fatal alert: CertificateRequired"
            ),
            Some(rustls::AlertDescription::CertificateRequired)
        );
        assert_eq!(alert_in("connection reset"), None);
        let hint = with_hint("broken pipe".into(), Security::Plain);
        assert!(hint.contains("https://"), "{hint}");
        let hint = with_hint(
            "connection closed".into(),
            Security::Tls { identity: false },
        );
        assert!(hint.contains("--tls-cert"), "{hint}");
        assert_eq!(with_hint("timed out".into(), Security::Plain), "timed out");
    }

    #[test]
    fn backoff_grows_jitters_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<_> = (0..6).map(|_| b.next_wait()).collect();
        let ceilings = [100, 200, 400, 800, 800, 800];
        for (w, c) in waits.iter().zip(ceilings) {
            let c = Duration::from_millis(c);
            assert!(*w >= c / 2 && *w <= c, "{w:?} outside [{:?}, {c:?}]", c / 2);
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
