//! The `docker` source: Services and endpoints from the labelled
//! containers of a Docker engine (the compose testbed's source).
//!
//! ```text
//!  engine ─ /events (container lifecycle + health, network connect) ─┐
//!         ─ /containers/json + inspect (on every (re)connect) ───────┼─▶ containers by id
//!                                                                    │    ─▶ containers::assemble
//!                                                                    │    ─▶ watch<SourceState>
//!  engine gone: last state kept, last_error set, retried with backoff┘
//! ```
//!
//! A session subscribes to events (from a second before it lists, so no
//! change between the list and the subscription is lost), lists the running
//! containers that carry `switchyard.io/service`, inspects each, publishes
//! a whole state, then applies events one by one: `start`, `unpause`,
//! `rename`, `update` and network `connect`/`disconnect` re-inspect the
//! container; `health_status: …` and `pause` change it in place; `kill`
//! with a stopping signal marks it terminating; `die`, `stop` and
//! `destroy` remove it. The events are filtered by type and action at the
//! engine: health checks run `exec` every interval, and those events would
//! otherwise flood the stream. A burst of changes publishes once, when it
//! ends (`--debounce`, see [`super::debounce`]); a session that ends
//! publishes what it had pending first.
//!
//! `--source docker` / `docker:HOST` follows one engine through bollard: a
//! session connects and negotiates the API version first. The first state
//! is published after the first list, so a control plane whose engine
//! cannot be reached stays not ready; a stream or request that fails keeps
//! the last state, sets `last_error` and retries (200 ms doubling to 10 s).
//! Each state is assembled whole and then shares the `Arc`s of what did
//! not change with the one before (`share_unchanged`), so the index diffs
//! it like a kube source's.
//!
//! What labels mean is in [`containers`]; a bad label is an `ObjectError`
//! naming the container and the label. Slices from containers carry no
//! port numbers of their own (`SlicePorts::FromServiceTargets`): the index
//! fills them from the owning Service's numeric `targetPort`s when it
//! groups slices by Service, so a Service declared in a YAML file can take
//! its endpoints from containers.

pub mod containers;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::debounce::{Burst, Debounce};
use super::{Source, SourceState};
use containers::{Container, Health, NetworkAddress, SERVICE_LABEL};

/// First wait after the engine went away; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two attempts to reach the engine.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Container actions that change what the source serves. Everything else
/// (`exec_*` from health checks above all) is filtered out by the engine.
const CONTAINER_ACTIONS: [&str; 11] = [
    "start",
    "restart",
    "die",
    "stop",
    "kill",
    "pause",
    "unpause",
    "destroy",
    "rename",
    "update",
    "health_status",
];

/// Signals that end a container (`docker stop` sends its stop signal,
/// SIGTERM unless the image names another; `docker kill` SIGKILL).
const STOPPING_SIGNALS: [&str; 4] = ["15", "9", "2", "3"];

/// How to reach the engine.
#[derive(Debug, Clone, Default)]
pub struct DockerSourceConfig {
    /// `unix:///path`, `tcp://host:port` or `http://…`; `None` is
    /// `$DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    pub host: Option<String>,
    /// Cluster id of the Services.
    pub cluster: String,
    /// How a burst of events coalesces into one publication.
    pub debounce: Debounce,
}

/// Serves what the labelled containers of one engine describe.
#[derive(Debug, Clone)]
pub struct DockerSource {
    config: DockerSourceConfig,
}

impl DockerSource {
    /// A source configured by `config`.
    pub fn new(config: DockerSourceConfig) -> Self {
        Self { config }
    }

    fn host(&self) -> String {
        self.config.host.clone().unwrap_or_else(|| {
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
        })
    }
}

impl Source for DockerSource {
    fn name(&self) -> String {
        match &self.config.host {
            Some(h) => format!("docker:{h}"),
            None => "docker".to_owned(),
        }
    }

    fn cluster(&self) -> String {
        self.config.cluster.clone()
    }

    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(*self, state, shutdown))
    }
}

/// Why a session with the engine ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// A request to the engine failed.
    #[error(transparent)]
    Engine(#[from] bollard::errors::Error),
    /// The event stream ended, as it does when the engine stops.
    #[error("the event stream ended")]
    EventsEnded,
}

async fn run(source: DockerSource, state: watch::Sender<SourceState>, shutdown: CancellationToken) {
    let name = source.name();
    let host = source.host();
    let mut view = View {
        source: name.clone(),
        cluster: source.config.cluster.clone(),
        containers: HashMap::new(),
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&host, source.config.debounce, &mut view, &state, &mut backoff) => r,
        };
        let message = format!("Docker engine {host}: {ended}");
        tracing::warn!(source = %name, error = %message, retry_in = ?backoff, "lost the Docker engine; serving the last state");
        state.send_if_modified(|s| {
            let new = Some(message.clone());
            (s.last_error != new).then(|| s.last_error = new).is_some()
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection to the engine: relist, then follow events until the
/// stream fails. Only returns on failure.
async fn session(
    host: &str,
    debounce: Debounce,
    view: &mut View,
    state: &watch::Sender<SourceState>,
    backoff: &mut Duration,
) -> SessionError {
    match session_inner(host, debounce, view, state, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    host: &str,
    debounce: Debounce,
    view: &mut View,
    state: &watch::Sender<SourceState>,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, SessionError> {
    let docker = Docker::connect_with_host(host)?.negotiate_version().await?;
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(1);
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(HashMap::from([
            (
                "type".to_owned(),
                vec!["container".to_owned(), "network".to_owned()],
            ),
            (
                "event".to_owned(),
                CONTAINER_ACTIONS
                    .iter()
                    .chain(&["connect", "disconnect"])
                    .map(|a| (*a).to_owned())
                    .collect(),
            ),
        ])),
    }));

    let listed = docker
        .list_containers(Some(ListContainersOptions {
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![SERVICE_LABEL.to_owned()],
            )])),
            ..ListContainersOptions::default()
        }))
        .await?;
    let mut containers = HashMap::new();
    for summary in listed {
        let Some(id) = summary.id else { continue };
        if let Some(c) = inspect(&docker, &id).await? {
            containers.insert(id, c);
        }
    }
    view.containers = containers;
    view.publish(state, true);
    tracing::info!(source = %view.source, %host, containers = view.containers.len(), "following the Docker engine");
    *backoff = FIRST_BACKOFF;

    let mut burst = Burst::default();
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = burst.ended() => {
                burst.clear();
                view.publish(state, true);
                continue;
            }
        };
        let changed = match next {
            Some(Ok(event)) => view.apply(&docker, &event).await,
            Some(Err(e)) => Err(e.into()),
            None => Err(SessionError::EventsEnded),
        };
        match changed {
            Ok(true) => burst.change(debounce, Instant::now()),
            Ok(false) => {}
            Err(e) => {
                if burst.pending() {
                    view.publish(state, true);
                }
                return Err(e);
            }
        }
    }
}

/// The containers the source follows, by id.
#[derive(Debug)]
struct View {
    source: String,
    cluster: String,
    containers: HashMap<String, Container>,
}

impl View {
    /// Applies one event; returns whether anything changed.
    async fn apply(&mut self, docker: &Docker, event: &EventMessage) -> Result<bool, SessionError> {
        let Some(actor) = &event.actor else {
            return Ok(false);
        };
        let attributes = actor.attributes.as_ref();
        let action = event.action.as_deref().unwrap_or_default();
        let id = match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                let labelled = attributes.is_some_and(|a| a.contains_key(SERVICE_LABEL));
                let id = actor.id.clone().unwrap_or_default();
                if !labelled && !self.containers.contains_key(&id) {
                    return Ok(false);
                }
                id
            }
            // A network event names the container among its attributes.
            Some(EventMessageTypeEnum::NETWORK) => {
                match attributes.and_then(|a| a.get("container")) {
                    Some(id) if self.containers.contains_key(id) => id.clone(),
                    _ => return Ok(false),
                }
            }
            _ => return Ok(false),
        };
        let before = self.containers.get(&id).cloned();
        if let Some(health) = action.strip_prefix("health_status:") {
            if let Some(c) = self.containers.get_mut(&id) {
                c.health = match health.trim() {
                    "healthy" => Health::Healthy,
                    "unhealthy" => Health::Unhealthy,
                    _ => Health::Starting,
                };
            }
        } else {
            match action {
                "die" | "stop" | "destroy" => {
                    self.containers.remove(&id);
                }
                "kill" => {
                    let signal = attributes.and_then(|a| a.get("signal"));
                    if let (Some(c), Some(s)) = (self.containers.get_mut(&id), signal)
                        && STOPPING_SIGNALS.contains(&s.as_str())
                    {
                        c.stopping = true;
                    }
                }
                "pause" | "unpause" => {
                    if let Some(c) = self.containers.get_mut(&id) {
                        c.paused = action == "pause";
                    }
                }
                _ => match inspect(docker, &id).await? {
                    Some(c) => {
                        self.containers.insert(id.clone(), c);
                    }
                    None => {
                        self.containers.remove(&id);
                    }
                },
            }
        }
        let changed = self.containers.get(&id) != before.as_ref();
        if changed {
            tracing::debug!(source = %self.source, container = %id, %action, "container changed");
        }
        Ok(changed)
    }

    fn publish(&self, state: &watch::Sender<SourceState>, synced: bool) {
        let containers: Vec<Container> = self.containers.values().cloned().collect();
        let assembled = containers::assemble(&containers, &self.cluster, &self.source);
        let mut new = SourceState {
            synced,
            services: assembled.services.into_iter().collect(),
            slices: assembled.slices.into_iter().collect(),
            errors: assembled.errors,
            exports: assembled.exports,
            ..SourceState::default()
        };
        super::share_unchanged(&state.borrow(), &mut new);
        super::publish(state, &self.source, new);
    }
}

/// The container as the source needs it; `None` when it is gone, stopped
/// or not labelled.
async fn inspect(docker: &Docker, id: &str) -> Result<Option<Container>, SessionError> {
    match docker.inspect_container(id, None).await {
        Ok(c) => Ok(convert(c)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn convert(c: ContainerInspectResponse) -> Option<Container> {
    let config = c.config?;
    let labels = config.labels.unwrap_or_default();
    if !labels.contains_key(SERVICE_LABEL) {
        return None;
    }
    let state = c.state.unwrap_or_default();
    if state.running != Some(true) {
        return None;
    }
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    let ip = |s: Option<String>| {
        s.filter(|s| !s.is_empty())
            .and_then(|s| s.parse::<IpAddr>().ok())
    };
    let mut networks: Vec<NetworkAddress> = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(network, e)| NetworkAddress {
            network,
            ipv4: ip(e.ip_address),
            ipv6: ip(e.global_ipv6_address),
        })
        .collect();
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    Some(Container {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        created: c.created.unwrap_or_default(),
        labels: labels.into_iter().collect(),
        running: true,
        paused: state.paused == Some(true),
        health,
        stopping: false,
        networks,
    })
}
