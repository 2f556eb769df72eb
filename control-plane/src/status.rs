//! What the control plane knows about itself and its agents, shared by the
//! index, the gRPC streams and the admin endpoint (`/status`, `/readyz`).
//!
//! Among it, each Node's facts ([`NodeFacts`]: its
//! `topology.kubernetes.io/zone` and why it is leaving, from the sources'
//! nodes), which every `SnapshotUpdate` carries as `node_zone` and
//! `node_draining`. When they change while an agent is up to date, its
//! stream sends an update without resources at the version the agent
//! ACKed (`AgentStream::facts_update` in `crate::server`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Serialize;

use crate::merge::ClustersetIssue;
use crate::source::ObjectError;

/// One agent's stream, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    /// Node name (from the certificate when mTLS is on).
    pub node: String,
    /// Cluster id the agent announced.
    pub cluster: String,
    /// Zone the agent announced, else its Node's zone (which it is told).
    pub zone: String,
    /// Whether a stream is open now.
    pub connected: bool,
    /// The last snapshot version the agent ACKed on its current or last stream.
    pub acked_version: Option<String>,
    /// The version it last rejected, while parked on it.
    pub nacked_version: Option<String>,
    /// The error of its last NACK; cleared by the next ACK.
    pub last_error: Option<String>,
    /// Updates sent on the current stream.
    pub pushes: u64,
    /// Resources sent on the current stream (changed ones only).
    pub resources_sent: u64,
    /// Why the control plane refused its last stream (unknown cluster, a
    /// node its API server does not know); cleared when it connects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Seconds since the Unix epoch when its last stream ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_at_unix: Option<u64>,
    /// While connected and not at the current snapshot: seconds since the
    /// version it runs stopped being current (or since it connected, when
    /// it has ACKed none or one from before this control plane started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind_seconds: Option<u64>,
    /// Other streams open now under the same node name: two agents given
    /// one `--node-name` (their updates and ACKs are not shown here), or,
    /// for a few seconds, a restarted agent's old stream not yet ended.
    #[serde(skip_serializing_if = "is_zero")]
    pub other_streams: usize,
    #[serde(skip)]
    stream_id: u64,
    #[serde(skip)]
    connected_at: Option<Instant>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The agents' state as metrics show it (`crate::metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AgentSignals {
    /// Connected agents not at the current snapshot.
    pub behind: usize,
    /// How long the agent furthest behind has been so (0 when none is).
    pub behind_seconds: f64,
    /// Node names with more than one stream open.
    pub duplicate_node_names: usize,
}

/// How long `/status` remembers agents that left.
#[derive(Debug, Clone, Copy)]
pub struct AgentRetention {
    /// Agents disconnected longer than this are forgotten.
    pub forget_after: std::time::Duration,
    /// At most this many disconnected agents are kept (the longest gone go first).
    pub max_disconnected: usize,
}

impl Default for AgentRetention {
    fn default() -> Self {
        Self {
            forget_after: std::time::Duration::from_secs(3600),
            max_disconnected: 10_000,
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One source, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// The source's name.
    pub name: String,
    /// The cluster of its objects.
    pub cluster: String,
    /// Whether its first full read is done.
    pub synced: bool,
    /// Why it cannot currently follow its origin (it keeps serving what it had).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Nodes and their zones, for sources that watch them.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub nodes: Arc<[crate::source::NodeInfo]>,
    /// Input it ignored in part or whole (unknown kinds, API versions and
    /// fields), with the file and document.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<ObjectError>,
    /// The cluster's DNS settings it read (the kube-dns ConfigMap), passed
    /// to the cluster's agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Arc<crate::source::ClusterDns>>,
}

/// One cluster, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// Its id.
    pub cluster: String,
    /// Every source of the cluster has synced: its agents are served.
    pub synced: bool,
    /// Not every source of the cluster fails.
    pub healthy: bool,
    /// Why its sources fail, if they do (`source: error`; ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Since when every source of it fails (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since_unix: Option<u64>,
    /// How old its data is: seconds since its sources last followed their
    /// origin (0 while healthy).
    pub stale_seconds: u64,
    /// `--cluster-down drop-after` has taken its exports out of the clusterset.
    pub exports_dropped: bool,
}

/// One Service of the snapshot, as `/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSummary {
    /// `namespace/name`.
    pub name: String,
    /// Its cluster.
    pub cluster: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`, or `Headless`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Cluster IPs (allocated ones included); empty when headless.
    pub cluster_ips: Vec<String>,
    /// Ports as `[name ]port/PROTOCOL`.
    pub ports: Vec<String>,
    /// Endpoints over all slices.
    pub endpoints: usize,
    /// Of those, ready ones.
    pub ready_endpoints: usize,
}

impl ServiceSummary {
    /// The summary of one validated Service and its slices.
    pub fn of(state: &switchyard_model::ServiceState) -> Self {
        use switchyard_model::ServiceType;
        let svc = &state.service;
        let kind = match svc.service_type {
            ServiceType::ExternalName => "ExternalName",
            _ if svc.headless => "Headless",
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        let endpoints = state.slices.iter().flat_map(|s| &s.endpoints);
        Self {
            name: format!("{}/{}", svc.key.namespace, svc.key.name),
            cluster: svc.key.cluster.clone(),
            kind,
            cluster_ips: svc.cluster_ips.iter().map(ToString::to_string).collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| {
                    let name = if p.name.is_empty() {
                        String::new()
                    } else {
                        format!("{} ", p.name)
                    };
                    format!("{name}{}/{}", p.port, p.protocol)
                })
                .collect(),
            endpoints: endpoints.clone().count(),
            ready_endpoints: endpoints.filter(|e| e.conditions.ready).count(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    version: Option<String>,
    resources: usize,
    sources: Vec<SourceStatus>,
    invalid_objects: Vec<ObjectError>,
    services: crate::index::Summaries,
    clusters: Vec<ClusterStatus>,
    clusterset_issues: Vec<ClustersetIssue>,
    all_synced: bool,
    agents: BTreeMap<String, AgentStatus>,
    next_stream: u64,
    /// Node name -> what its agent is told of it, from the sources' nodes.
    nodes: HashMap<String, NodeFacts>,
    /// Cluster -> its DNS settings, from the sources that read them.
    cluster_dns: HashMap<String, Arc<crate::source::ClusterDns>>,
    /// Cluster -> how writing the clusterset into it goes.
    write_back: BTreeMap<String, WriteBackStatus>,
    retention: AgentRetention,
    /// Version -> when it stopped being current, for the versions agents
    /// still hold.
    superseded: HashMap<String, Instant>,
    /// Node name -> the streams open under it (stream id, peer address).
    open_streams: HashMap<String, Vec<(u64, Option<IpAddr>)>>,
    /// Node names already warned about: streams from two addresses.
    warned_duplicates: std::collections::HashSet<String>,
}

impl Inner {
    /// Since when `agent` has been behind the current snapshot, if it is
    /// connected and behind.
    fn behind_since(&self, agent: &AgentStatus) -> Option<Instant> {
        let current = self.version.as_ref()?;
        if !agent.connected || agent.acked_version.as_ref() == Some(current) {
            return None;
        }
        let superseded = agent
            .acked_version
            .as_ref()
            .and_then(|v| self.superseded.get(v));
        superseded.copied().or(agent.connected_at)
    }

    /// Streams open under `node` besides the one `/status` shows.
    fn other_streams(&self, agent: &AgentStatus) -> usize {
        let open = self.open_streams.get(&agent.node).map_or(0, Vec::len);
        open.saturating_sub(usize::from(agent.connected))
    }

    /// Forgets agents gone longer than the retention, and the longest gone
    /// beyond its count.
    fn prune(&mut self) {
        let now = unix_now();
        let forget = self.retention.forget_after.as_secs();
        self.agents.retain(|_, a| match a.disconnected_at_unix {
            Some(at) => now.saturating_sub(at) < forget && !self.retention.forget_after.is_zero(),
            None => true,
        });
        let gone = self
            .agents
            .values()
            .filter(|a| a.disconnected_at_unix.is_some())
            .count();
        if gone > self.retention.max_disconnected {
            let mut by_age: Vec<(u64, String)> = self
                .agents
                .values()
                .filter_map(|a| a.disconnected_at_unix.map(|t| (t, a.node.clone())))
                .collect();
            by_age.sort();
            for (_, node) in by_age
                .into_iter()
                .take(gone - self.retention.max_disconnected)
            {
                self.agents.remove(&node);
            }
        }
    }
}

/// The status document served at `/status`.
#[derive(Debug, Serialize)]
pub struct StatusDocument {
    /// Current snapshot version; null before the first snapshot.
    pub version: Option<String>,
    /// Whether every source has synced and a snapshot exists.
    pub ready: bool,
    /// Resources (Services) in the current snapshot.
    pub resources: usize,
    /// Sources and whether they synced.
    pub sources: Vec<SourceStatus>,
    /// Objects skipped, with the reason.
    pub invalid_objects: Vec<ObjectError>,
    /// Agents connected now or gone for less than the retention
    /// (`--forget-agents-after`, at most 10,000 gone ones), by node name.
    pub agents: Vec<AgentStatus>,
    /// Every Service of the snapshot, by name (`cluster/namespace/name`);
    /// the clusterset's imports under cluster `clusterset`.
    pub services: Vec<Arc<ServiceSummary>>,
    /// Every cluster the sources name: synced, healthy, how old its data is.
    pub clusters: Vec<ClusterStatus>,
    /// Exports that conflict or cannot be used (KEP-1645 conditions).
    pub clusterset_issues: Vec<ClustersetIssue>,
    /// How writing ServiceImports and ServiceExport conditions into each
    /// cluster's API server goes, by cluster.
    pub write_back: BTreeMap<String, WriteBackStatus>,
}

/// How writing the clusterset into one cluster's API server goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WriteBackStatus {
    /// The MCS API version written (`multicluster.x-k8s.io/v1beta1`), or
    /// none while the cluster serves neither.
    pub api_version: Option<String>,
    /// ServiceImports that match what the clusterset holds.
    pub imports: usize,
    /// ServiceExports whose conditions are written.
    pub exports: usize,
    /// Writes that succeeded since the control plane started.
    pub writes: u64,
    /// Objects whose last write failed, with why (retried with backoff).
    pub failing: Vec<ObjectError>,
    /// When everything last matched (Unix seconds), if ever.
    pub in_sync_at_unix: Option<u64>,
}

/// What the control plane tells an agent about its own Node and cluster,
/// besides its Services (`SnapshotUpdate.node_zone`, `node_draining`,
/// `cluster_dns`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The Node's `topology.kubernetes.io/zone`, empty when unknown.
    pub zone: String,
    /// Why the Node is leaving the cluster, empty while it is not.
    pub draining: String,
    /// Its cluster's DNS settings (the kube-dns ConfigMap), when a source
    /// reads them.
    pub dns: Option<Arc<crate::source::ClusterDns>>,
}

/// Shared, lock-protected status. Critical sections are a few field writes.
/// Every change bumps a generation that [`Status::subscribe`] follows, so
/// observers wait for events instead of polling. Changes of the nodes'
/// facts bump a generation of their own ([`Status::subscribe_node_facts`]),
/// which the agents' streams follow.
#[derive(Debug)]
pub struct Status {
    inner: Mutex<Inner>,
    generation: tokio::sync::watch::Sender<u64>,
    node_facts: tokio::sync::watch::Sender<u64>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            generation: tokio::sync::watch::Sender::new(0),
            node_facts: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Identifies one stream of one node, so a stale stream's end does not mark
/// a reconnected agent as gone.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    node: String,
    id: u64,
}

impl Status {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the lock, then wakes subscribers.
    fn change<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = f(&mut self.lock());
        self.generation.send_modify(|g| *g += 1);
        out
    }

    /// A status that forgets agents as `retention` says.
    pub fn with_retention(retention: AgentRetention) -> Self {
        let s = Self::default();
        s.lock().retention = retention;
        s
    }

    /// Wakes on every change of the status.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Records a new snapshot, its Services and what the index skipped.
    pub fn set_snapshot(
        &self,
        version: &str,
        resources: usize,
        invalid: Vec<ObjectError>,
        services: crate::index::Summaries,
        issues: Vec<ClustersetIssue>,
    ) {
        self.change(|s| {
            if let Some(previous) = s.version.take()
                && previous != version
            {
                s.superseded.insert(previous, Instant::now());
            }
            // Only versions some agent still holds are worth a time.
            let held: std::collections::HashSet<&String> = s
                .agents
                .values()
                .filter_map(|a| a.acked_version.as_ref())
                .collect();
            let mut superseded = std::mem::take(&mut s.superseded);
            superseded.retain(|v, _| held.contains(v));
            s.superseded = superseded;
            s.version = Some(version.to_owned());
            s.resources = resources;
            s.invalid_objects = invalid;
            s.services = services;
            s.clusterset_issues = issues;
        });
    }

    /// Records the skipped objects when the snapshot itself did not change.
    pub fn set_invalid(&self, invalid: Vec<ObjectError>, issues: Vec<ClustersetIssue>) {
        self.change(|s| {
            s.invalid_objects = invalid;
            s.clusterset_issues = issues;
        });
    }

    /// Records each cluster's state and whether every source has synced.
    pub fn set_clusters(&self, clusters: Vec<ClusterStatus>, all_synced: bool) {
        self.change(|s| {
            s.clusters = clusters;
            s.all_synced = all_synced;
        });
    }

    /// Records the sources' sync state (and the facts of the nodes they know).
    pub fn set_sources(&self, sources: Vec<SourceStatus>) {
        let mut nodes: HashMap<String, NodeFacts> = HashMap::new();
        for node in sources.iter().flat_map(|src| src.nodes.iter()) {
            // The first source to know a node wins, as for Services.
            nodes.entry(node.name.clone()).or_insert_with(|| NodeFacts {
                zone: node.zone.clone().unwrap_or_default(),
                draining: node.draining.clone().unwrap_or_default(),
                dns: None,
            });
        }
        nodes.retain(|_, f| *f != NodeFacts::default());
        let mut cluster_dns = HashMap::new();
        for src in &sources {
            if let Some(dns) = &src.dns {
                cluster_dns
                    .entry(src.cluster.clone())
                    .or_insert_with(|| dns.clone());
            }
        }
        let moved = self.change(|s| {
            s.sources = sources;
            let moved = s.nodes != nodes || s.cluster_dns != cluster_dns;
            if moved {
                s.nodes = nodes;
                s.cluster_dns = cluster_dns;
            }
            moved
        });
        if moved {
            self.node_facts.send_modify(|g| *g += 1);
        }
    }

    /// What `node`'s agent, of `cluster`, is told of its Node (its zone,
    /// whether it is draining) and its cluster (DNS settings); empty when
    /// no source knows them.
    pub fn node_facts(&self, cluster: &str, node: &str) -> NodeFacts {
        let s = self.lock();
        let mut facts = s.nodes.get(node).cloned().unwrap_or_default();
        facts.dns = s.cluster_dns.get(cluster).cloned();
        facts
    }

    /// Wakes when the facts of any node change.
    pub fn subscribe_node_facts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.node_facts.subscribe()
    }

    /// Ready once every source has synced and a snapshot exists.
    pub fn ready(&self) -> bool {
        let s = self.lock();
        s.all_synced && s.version.is_some()
    }

    /// The current snapshot version.
    pub fn version(&self) -> Option<String> {
        self.lock().version.clone()
    }

    /// A stream for `node` opened.
    pub fn connected(&self, node: &str, cluster: &str, zone: &str) -> StreamHandle {
        self.connected_from(node, cluster, zone, None)
    }

    /// A stream for `node` opened from `peer`. A second stream under the
    /// same name from another address is logged at WARN (once, until the
    /// name is held from one address again): two agents share a node
    /// name, and `/status` can show only one of them.
    pub fn connected_from(
        &self,
        node: &str,
        cluster: &str,
        zone: &str,
        peer: Option<IpAddr>,
    ) -> StreamHandle {
        let (handle, others, warn) = self.change(|s| {
            let others: Vec<Option<IpAddr>> = s
                .open_streams
                .get(node)
                .into_iter()
                .flatten()
                .map(|(_, p)| *p)
                .collect();
            let handle = Self::connect_locked(s, node, cluster, zone);
            s.open_streams
                .entry(node.to_owned())
                .or_default()
                .push((handle.id, peer));
            let elsewhere = others.iter().any(|p| *p != peer);
            let warn = elsewhere && s.warned_duplicates.insert(node.to_owned());
            (handle, others, warn)
        });
        let address =
            |p: &Option<IpAddr>| p.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        if warn {
            let addresses: Vec<String> = others.iter().chain([&peer]).map(address).collect();
            tracing::warn!(
                %node,
                addresses = %addresses.join(", "),
                "two agents are connected with the same node name: /status shows only the \
                 latest (its other_streams counts the rest); give each agent its own --node-name"
            );
        } else if !others.is_empty() && others.iter().all(|p| *p == peer) {
            // From the same address: as a rule a restarted agent whose old
            // stream has not ended yet.
            tracing::info!(
                %node,
                address = %address(&peer),
                "agent connected again while its previous stream is still open (a restart?)"
            );
        }
        handle
    }

    fn connect_locked(s: &mut Inner, node: &str, cluster: &str, zone: &str) -> StreamHandle {
        s.next_stream += 1;
        let id = s.next_stream;
        let prev = s.agents.remove(node);
        s.agents.insert(
            node.to_owned(),
            AgentStatus {
                node: node.to_owned(),
                cluster: cluster.to_owned(),
                zone: zone.to_owned(),
                connected: true,
                acked_version: prev.as_ref().and_then(|p| p.acked_version.clone()),
                nacked_version: None,
                last_error: None,
                pushes: 0,
                resources_sent: 0,
                refused: None,
                disconnected_at_unix: None,
                behind_seconds: None,
                other_streams: 0,
                stream_id: id,
                connected_at: Some(Instant::now()),
            },
        );
        s.prune();
        StreamHandle {
            node: node.to_owned(),
            id,
        }
    }

    fn with_agent(&self, h: &StreamHandle, f: impl FnOnce(&mut AgentStatus)) {
        self.change(|s| {
            if let Some(a) = s.agents.get_mut(&h.node)
                && a.stream_id == h.id
            {
                f(a);
            }
        });
    }

    /// An update went out.
    pub fn pushed(&self, h: &StreamHandle, resources: usize) {
        self.with_agent(h, |a| {
            a.pushes += 1;
            a.resources_sent += resources as u64;
        });
    }

    /// The agent ACKed `version`.
    pub fn acked(&self, h: &StreamHandle, version: &str) {
        self.with_agent(h, |a| {
            a.acked_version = Some(version.to_owned());
            a.nacked_version = None;
            a.last_error = None;
        });
    }

    /// The agent NACKed `version` with `error`.
    pub fn nacked(&self, h: &StreamHandle, version: &str, error: &str) {
        self.with_agent(h, |a| {
            a.nacked_version = Some(version.to_owned());
            a.last_error = Some(error.to_owned());
        });
    }

    /// The stream ended.
    pub fn disconnected(&self, h: &StreamHandle) {
        self.with_agent(h, |a| {
            a.connected = false;
            a.disconnected_at_unix = Some(unix_now());
        });
        self.change(|s| {
            if let Some(open) = s.open_streams.get_mut(&h.node) {
                open.retain(|(id, _)| *id != h.id);
                let one_address = open.windows(2).all(|w| w[0].1 == w[1].1);
                if open.is_empty() {
                    s.open_streams.remove(&h.node);
                }
                if one_address {
                    s.warned_duplicates.remove(&h.node);
                }
            }
            s.prune();
        });
    }

    /// What an operator alerts on about the agents, now.
    pub fn agent_signals(&self) -> AgentSignals {
        let s = self.lock();
        let now = Instant::now();
        let behind: Vec<Instant> = s
            .agents
            .values()
            .filter_map(|a| s.behind_since(a))
            .collect();
        AgentSignals {
            behind: behind.len(),
            behind_seconds: behind
                .iter()
                .map(|t| now.saturating_duration_since(*t).as_secs_f64())
                .fold(0.0, f64::max),
            duplicate_node_names: s.open_streams.values().filter(|o| o.len() > 1).count(),
        }
    }

    /// A stream of `node` was refused for `why` (shown until it connects).
    pub fn refused(&self, node: &str, cluster: &str, zone: &str, why: &str) {
        self.change(|s| {
            if s.agents.get(node).is_some_and(|a| a.connected) {
                // A stream of the same name is open: do not disturb it.
                return;
            }
            let prev = s.agents.remove(node);
            s.agents.insert(
                node.to_owned(),
                AgentStatus {
                    node: node.to_owned(),
                    cluster: cluster.to_owned(),
                    zone: zone.to_owned(),
                    connected: false,
                    acked_version: prev.and_then(|p| p.acked_version),
                    nacked_version: None,
                    last_error: None,
                    pushes: 0,
                    resources_sent: 0,
                    refused: Some(why.to_owned()),
                    disconnected_at_unix: Some(unix_now()),
                    behind_seconds: None,
                    other_streams: 0,
                    stream_id: 0,
                    connected_at: None,
                },
            );
            s.prune();
        });
    }

    /// How many agents are connected now.
    pub fn connected_agents(&self) -> usize {
        self.lock().agents.values().filter(|a| a.connected).count()
    }

    /// The document for `/status`.
    pub fn document(&self) -> StatusDocument {
        let mut s = self.lock();
        s.prune();
        StatusDocument {
            version: s.version.clone(),
            ready: s.all_synced && s.version.is_some(),
            resources: s.resources,
            sources: s.sources.clone(),
            invalid_objects: s.invalid_objects.clone(),
            agents: s
                .agents
                .values()
                .map(|a| {
                    let mut a = a.clone();
                    a.behind_seconds = s.behind_since(&a).map(|t| t.elapsed().as_secs());
                    a.other_streams = s.other_streams(&a);
                    // An agent that announced no zone is told its Node's.
                    if a.zone.is_empty()
                        && let Some(facts) = s.nodes.get(&a.node)
                    {
                        a.zone.clone_from(&facts.zone);
                    }
                    a
                })
                .collect(),
            services: s.services.values().cloned().collect(),
            clusters: s.clusters.clone(),
            clusterset_issues: s.clusterset_issues.clone(),
            write_back: s.write_back.clone(),
        }
    }

    /// Records how writing the clusterset into `cluster` goes.
    pub fn set_write_back(&self, cluster: &str, status: WriteBackStatus) {
        self.change(|s| {
            s.write_back.insert(cluster.to_owned(), status);
        });
    }
}

/// A Service and its endpoints with their conditions, as `/status?service=` shows it.
pub fn service_view(state: &switchyard_model::ServiceState) -> serde_json::Value {
    let svc = &state.service;
    let summary = ServiceSummary::of(state);
    serde_json::json!({
        "name": summary.name,
        "cluster": summary.cluster,
        "type": summary.kind,
        "cluster_ips": summary.cluster_ips,
        "ports": svc.ports.iter().map(|p| serde_json::json!({
            "name": p.name,
            "protocol": p.protocol.to_string(),
            "port": p.port,
            "target_port": match &p.target_port {
                switchyard_model::TargetPort::Number(n) => serde_json::json!(n),
                switchyard_model::TargetPort::Name(n) => serde_json::json!(n),
            },
            "node_port": p.node_port,
        })).collect::<Vec<_>>(),
        "external_ips": svc.external_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "slices": state.slices.iter().map(|s| serde_json::json!({
            "name": s.name,
            "ports": s.ports.iter().map(|p| format!("{} {}/{}", p.name, p.port, p.protocol)).collect::<Vec<_>>(),
            "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                "addresses": e.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ready": e.conditions.ready,
                "serving": e.conditions.serving,
                "terminating": e.conditions.terminating,
                "node": e.node_name.as_deref(),
                "zone": e.zone.as_deref(),
                "hints": e.hint_zones().iter().map(AsRef::as_ref).collect::<Vec<&str>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
