//! Transparent mode (`--dns-service NAMESPACE/NAME`, `kube-system/kube-dns`
//! in the DaemonSet): pods that use the cluster DNS Service's IP, as
//! kubelet's `clusterDNS` tells them to, are answered by this node's stub,
//! with no kubelet change, as NodeLocal DNSCache does in its iptables mode.
//!
//! ```text
//!  state in force ─▶ takeover(): the Service's cluster IPs and DNS port, its ready endpoints
//!     new address:  ip addr (nodelocaldns, or lo) ─▶ bind UDP+TCP, serve ─▶ NOTRACK rules (traffic now comes here)
//!     gone address: NOTRACK rules off (the Service's DNAT takes over) ─▶ stop serving ─▶ ip addr del
//!     endpoints:    names outside our zones go to them (else to --dns-upstream / resolv.conf)
//!  stop (no successor): every address handed back the same way, before the stub stops
//! ```
//!
//! Why NOTRACK is enough: the raw table runs before conntrack, and an
//! untracked packet skips the nat table, so the Service's DNAT rules do
//! not see it and the kernel delivers it to the address on this node.
//! Taking those rules away hands the traffic back to the DNAT rules, which
//! send it to the Service's endpoints (CoreDNS): switching the mode on or
//! off, or stopping the agent, never leaves pods without an answer. The
//! stub forwards to the endpoints' addresses directly, never to the
//! Service's IP, so its own queries are not captured again (NodeLocal
//! DNSCache needs a second Service, `kube-dns-upstream`, for that).
//!
//! The sockets bound on a taken address go to the DNS thread
//! (`Control::listen`, served like `--dns-listen` until their token is
//! cancelled); the endpoints replace the default route of
//! `forward::Routes` (`Control::set_service_endpoints`; with no ready
//! endpoint, the configured upstreams). `Agent::shutdown` hands
//! the addresses back before anything else stops. A start after a SIGKILL
//! reconciles the NOTRACK rules to exactly what it wants
//! (`link::notrack`), so a mode switched off leaves nothing behind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_model::Protocol;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Control, link};
use crate::state::AgentState;
use crate::status::Status;

/// The cluster DNS Service, `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsService {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::str::FromStr for DnsService {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?}: expected NAMESPACE/NAME (kube-system/kube-dns)"
            )),
        }
    }
}

impl std::fmt::Display for DnsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the cluster DNS Service asks of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Takeover {
    /// Its cluster IPs with its DNS port: the stub answers there.
    pub listen: Vec<SocketAddr>,
    /// Its ready endpoints on the port's target: where names outside the
    /// stub's zones go.
    pub upstreams: Vec<SocketAddr>,
}

/// The DNS port of a Service: the UDP port named `dns`, else UDP 53, else
/// its first UDP port.
fn dns_port(svc: &switchyard_model::Service) -> Option<&switchyard_model::ServicePort> {
    let udp = || svc.ports.iter().filter(|p| p.protocol == Protocol::Udp);
    udp()
        .find(|p| p.name == "dns")
        .or_else(|| udp().find(|p| p.port == 53))
        .or_else(|| udp().next())
}

/// What `service` of `cluster` in `state` asks: nothing when the agent
/// holds no such Service, or it has no cluster IP or UDP port.
pub fn takeover(state: &AgentState, cluster: &str, service: &DnsService) -> Takeover {
    let key = format!("{cluster}/{}/{}", service.namespace, service.name);
    let Some(held) = state.resources.get(&key) else {
        return Takeover::default();
    };
    let svc = &held.state.service;
    let Some(port) = dns_port(svc) else {
        return Takeover::default();
    };
    let mut listen: Vec<SocketAddr> = svc
        .cluster_ips
        .iter()
        .map(|ip| SocketAddr::new(*ip, port.port))
        .collect();
    listen.sort();
    let mut upstreams: Vec<SocketAddr> = Vec::new();
    for slice in &held.state.slices {
        // A slice names its ports after the Service's.
        let target = slice
            .ports
            .iter()
            .find(|p| p.protocol == Protocol::Udp && p.name == port.name);
        let Some(target) = target else { continue };
        for e in slice.endpoints.iter().filter(|e| e.conditions.ready) {
            upstreams.extend(
                e.addresses
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, target.port)),
            );
        }
    }
    upstreams.sort();
    upstreams.dedup();
    Takeover { listen, upstreams }
}

/// An address taken over: where it was put, and its serving.
#[derive(Debug)]
struct Held {
    interface: &'static str,
    serving: CancellationToken,
}

/// What [`run`] works with besides the state.
#[derive(Debug)]
pub struct Takeovers {
    /// The cluster DNS Service.
    pub service: DnsService,
    /// This agent's cluster.
    pub cluster: String,
    /// The stub's own link-local address, whose NOTRACK rules stay.
    pub own: Option<SocketAddr>,
    /// The stub, to serve and forward.
    pub control: Control,
    /// Where `/status` shows what is taken over.
    pub status: Arc<Status>,
    /// Cancelled when the agent stops: hand every address back.
    pub handback: CancellationToken,
    /// Whether a successor took this agent's sockets: then nothing is
    /// handed back (the successor serves those addresses now).
    pub phase: watch::Receiver<crate::handoff::Phase>,
    /// Told once the first state has been taken in.
    pub first_pass: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Follows the state and takes over the Service's addresses, until
/// `handback` (the agent stops); then hands every address back before
/// returning, unless a successor took them.
pub async fn run(t: Takeovers, mut state: watch::Receiver<Arc<AgentState>>) {
    let Takeovers {
        service,
        cluster,
        own,
        control,
        status,
        handback,
        phase,
        mut first_pass,
    } = t;
    let mut held: BTreeMap<SocketAddr, Held> = BTreeMap::new();
    let mut upstreams: Option<Vec<SocketAddr>> = None;
    loop {
        let wanted = takeover(&state.borrow_and_update(), &cluster, &service);
        // Gone first: the rules off (the DNAT rules take over), then the serving.
        let gone: Vec<SocketAddr> = held
            .keys()
            .filter(|a| !wanted.listen.contains(a))
            .copied()
            .collect();
        if !gone.is_empty() {
            let keep: Vec<SocketAddr> =
                held.keys().filter(|a| !gone.contains(a)).copied().collect();
            set_notrack(own, &keep).await;
            for addr in gone {
                if let Some(h) = held.remove(&addr) {
                    release(addr, h, &control).await;
                }
            }
        }
        // New: the address, the serving, then the rules.
        let mut added = false;
        let new: Vec<SocketAddr> = wanted
            .listen
            .iter()
            .filter(|a| !held.contains_key(a))
            .copied()
            .collect();
        for addr in &new {
            match take(*addr, &control).await {
                Ok(h) => {
                    tracing::info!(%addr, service = %service, interface = h.interface, "answering for the cluster DNS Service");
                    held.insert(*addr, h);
                    added = true;
                }
                Err(e) => {
                    tracing::error!(%addr, service = %service, "cannot answer for the cluster DNS Service: {e:#}")
                }
            }
        }
        if added {
            let all: Vec<SocketAddr> = held.keys().copied().collect();
            set_notrack(own, &all).await;
        }
        if upstreams.as_ref() != Some(&wanted.upstreams) {
            tracing::info!(endpoints = ?wanted.upstreams, service = %service, "the cluster DNS Service's endpoints (where other names go)");
            control.set_service_endpoints(&wanted.upstreams);
            upstreams = Some(wanted.upstreams.clone());
        }
        let answering: Vec<String> = held.keys().map(ToString::to_string).collect();
        status.update(|d| {
            if let Some(dns) = d.dns.as_mut() {
                dns.service = Some(service.to_string());
                dns.service_addresses.clone_from(&answering);
            }
        });
        if let Some(tx) = first_pass.take() {
            let _ = tx.send(());
        }
        tokio::select! {
            r = state.changed() => if r.is_err() {
                // The state's owner went (a successor takes over): keep
                // everything until the agent stops.
                handback.cancelled().await;
                break;
            },
            () = handback.cancelled() => break,
        }
    }
    if *phase.borrow() != crate::handoff::Phase::Serving {
        tracing::info!(service = %service, "a successor serves the cluster DNS Service's addresses; leaving them in place");
        for h in held.values() {
            h.serving.cancel();
        }
        return;
    }
    // Handing back: the DNAT rules answer from the moment the rules are off.
    set_notrack(own, &[]).await;
    for (addr, h) in std::mem::take(&mut held) {
        release(addr, h, &control).await;
    }
    if upstreams.is_some() {
        tracing::info!(service = %service, "handed the cluster DNS Service's addresses back to its rules");
    }
}

/// Puts `addr`'s address on the node and serves it.
async fn take(addr: SocketAddr, control: &Control) -> anyhow::Result<Held> {
    let interface = tokio::task::spawn_blocking(move || link::put_address(addr.ip())).await??;
    let serving = control.listen(addr)?;
    Ok(Held { interface, serving })
}

/// Stops serving `addr` and takes its address off the node.
async fn release(addr: SocketAddr, h: Held, control: &Control) {
    h.serving.cancel();
    control.forget(addr);
    let removed =
        tokio::task::spawn_blocking(move || link::remove_address(addr.ip(), h.interface)).await;
    match removed {
        Ok(Ok(())) => tracing::info!(%addr, "no longer answering for the cluster DNS Service"),
        Ok(Err(e)) => tracing::warn!(%addr, "taking the address off: {e}"),
        Err(e) => tracing::warn!(%addr, "taking the address off: {e}"),
    }
}

/// Makes the NOTRACK rules those of `own` and `taken`.
async fn set_notrack(own: Option<SocketAddr>, taken: &[SocketAddr]) {
    let wanted: Vec<SocketAddr> = own.into_iter().chain(taken.iter().copied()).collect();
    match tokio::task::spawn_blocking(move || link::notrack(&wanted)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("the DNS NOTRACK rules: {e}"),
        Err(e) => tracing::error!("the DNS NOTRACK rules: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AgentState, HeldResource};
    use switchyard_model::{
        AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Service,
        ServiceKey, ServicePort, ServiceState, TargetPort,
    };

    fn kube_dns(ips: &[&str], ready: &[(&str, bool)]) -> AgentState {
        let mut svc = Service::new(ServiceKey::new("c1", "kube-system", "kube-dns"));
        svc.cluster_ips = ips.iter().map(|i| i.parse().expect("ip")).collect();
        for (name, protocol) in [("dns", Protocol::Udp), ("dns-tcp", Protocol::Tcp)] {
            svc.ports.push(ServicePort {
                name: name.into(),
                protocol,
                port: 53,
                target_port: TargetPort::Name(name.into()),
                node_port: None,
            });
        }
        let slice = EndpointSlice {
            name: "kube-dns-1".into(),
            address_type: AddressType::IPv4,
            endpoints: ready
                .iter()
                .map(|(ip, ready)| Endpoint {
                    addresses: vec![ip.parse().expect("ip")].into(),
                    conditions: EndpointConditions {
                        ready: *ready,
                        serving: *ready,
                        terminating: false,
                    },
                    ..Endpoint::default()
                })
                .collect(),
            ports: vec![
                EndpointPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 5353,
                },
                EndpointPort {
                    name: "dns-tcp".into(),
                    protocol: Protocol::Tcp,
                    port: 5353,
                },
            ],
            cluster: None,
            trigger_time_unix_nanos: None,
        };
        let mut state = AgentState::default();
        state.resources.insert(
            "c1/kube-system/kube-dns".into(),
            HeldResource {
                version: "1".into(),
                state: Arc::new(ServiceState {
                    service: svc,
                    slices: vec![slice],
                }),
            },
        );
        state
    }

    fn dns() -> DnsService {
        "kube-system/kube-dns".parse().expect("parses")
    }

    #[test]
    fn the_services_ips_and_its_ready_endpoints() {
        let state = kube_dns(
            &["10.96.0.10", "fd00:96::a"],
            &[("10.244.1.5", true), ("10.244.2.5", false)],
        );
        let t = takeover(&state, "c1", &dns());
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(t.listen, [sa("10.96.0.10:53"), sa("[fd00:96::a]:53")]);
        assert_eq!(
            t.upstreams,
            [sa("10.244.1.5:5353")],
            "ready ones, their target port"
        );
        assert_eq!(
            takeover(&state, "c2", &dns()),
            Takeover::default(),
            "another cluster's"
        );
        let none = takeover(&AgentState::default(), "c1", &dns());
        assert!(none.listen.is_empty() && none.upstreams.is_empty());
    }

    #[test]
    fn the_flag_names_a_namespace_and_a_service() {
        assert_eq!(dns().to_string(), "kube-system/kube-dns");
        for bad in ["kube-dns", "/x", "x/", "a/b/c"] {
            let e = bad.parse::<DnsService>().expect_err(bad);
            assert!(e.contains("NAMESPACE/NAME"), "{e}");
        }
    }
}
