//! Endpoint slices: where a Service's traffic may go.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::Protocol;
use crate::error::{Collector, ValidationErrors};
use crate::service::{ServiceKey, is_dns_label, is_dns_subdomain, object_name};

/// `addressType` of a slice. FQDN slices are not proxied (kube-proxy ignores
/// them too), so sources drop them before they reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressType {
    /// IPv4 addresses.
    #[default]
    IPv4,
    /// IPv6 addresses.
    IPv6,
}

/// The state of one endpoint, with Kubernetes' defaults already applied
/// (`ready` unset means ready; `serving` unset means `ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Ready for new connections.
    pub ready: bool,
    /// Able to serve, regardless of terminating.
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
}

impl Default for EndpointConditions {
    fn default() -> Self {
        Self {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// An endpoint's addresses, all of one family. Kubernetes gives every
/// endpoint one address (the API allows up to 100; kube-proxy uses the
/// first), so one address is held inline: a million endpoints need no
/// heap block for it (a `Vec` of one took a 32-byte block each). Reads go
/// through the slice ([`std::ops::Deref`]); build one from a `Vec`, an
/// iterator or a single address.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Addresses(AddressesRepr);

/// `One` exactly when there is one address, so derived equality is exact.
#[derive(Clone, PartialEq, Eq, Hash)]
enum AddressesRepr {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

impl Addresses {
    /// Adds `ip` at the end.
    pub fn push(&mut self, ip: IpAddr) {
        let mut v = self.to_vec();
        v.push(ip);
        *self = v.into();
    }

    /// Removes every address.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Default for Addresses {
    fn default() -> Self {
        Self(AddressesRepr::Many(Box::default()))
    }
}

impl std::ops::Deref for Addresses {
    type Target = [IpAddr];

    fn deref(&self) -> &[IpAddr] {
        match &self.0 {
            AddressesRepr::One(ip) => std::slice::from_ref(ip),
            AddressesRepr::Many(ips) => ips,
        }
    }
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl From<IpAddr> for Addresses {
    fn from(ip: IpAddr) -> Self {
        Self(AddressesRepr::One(ip))
    }
}

impl From<Vec<IpAddr>> for Addresses {
    fn from(v: Vec<IpAddr>) -> Self {
        match v[..] {
            [ip] => Self(AddressesRepr::One(ip)),
            _ => Self(AddressesRepr::Many(v.into_boxed_slice())),
        }
    }
}

impl FromIterator<IpAddr> for Addresses {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        let mut it = iter.into_iter();
        let Some(first) = it.next() else {
            return Self::default();
        };
        match it.next() {
            None => Self(AddressesRepr::One(first)),
            Some(second) => {
                let mut v = vec![first, second];
                v.extend(it);
                v.into()
            }
        }
    }
}

impl<'a> IntoIterator for &'a Addresses {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// `name` as an `Arc<str>` shared with every other holder of the same
/// name, for the names many endpoints repeat (their node, their zone,
/// their hints): 100,000 Services of 10 endpoints name a few hundred nodes
/// a million times. Conversions of large states (the agent's decoding,
/// the kube and file sources) call this; an `Arc` made any other way
/// works the same, only unshared.
///
/// The table of names is process-wide. When a new name would take it
/// past twice the names in use at its last sweep (at least 1,024), the
/// names no one holds any more are dropped from it first: it grows with
/// the names in use, not with every name it was ever given.
pub fn shared_name(name: &str) -> Arc<str> {
    static NAMES: Mutex<Option<SharedNames>> = Mutex::new(None);
    let mut guard = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let names = guard.get_or_insert_with(|| SharedNames {
        set: HashSet::new(),
        sweep_at: SharedNames::MIN_SWEEP,
    });
    if let Some(a) = names.set.get(name) {
        return Arc::clone(a);
    }
    if names.set.len() >= names.sweep_at {
        names.set.retain(|a| Arc::strong_count(a) > 1);
        names.sweep_at = (names.set.len() * 2).max(SharedNames::MIN_SWEEP);
        names.set.shrink_to(names.sweep_at);
    }
    #[cfg(test)]
    TABLE_LEN.store(names.set.len() + 1, std::sync::atomic::Ordering::Relaxed);
    let a: Arc<str> = Arc::from(name);
    names.set.insert(Arc::clone(&a));
    a
}

/// The size of the table after the last [`shared_name`], for tests.
#[cfg(test)]
static TABLE_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The table behind [`shared_name`].
struct SharedNames {
    set: HashSet<Arc<str>>,
    /// Its size at which names no one holds are swept out.
    sweep_at: usize,
}

impl SharedNames {
    const MIN_SWEEP: usize = 1_024;
}

/// One backend, as an EndpointSlice carries it.
///
/// A large state is mostly endpoints (a million for 100,000 Services of 10),
/// so they are compact: the one address inline ([`Addresses`]), the names
/// it shares with other endpoints (node, zone, hints) [`shared_name`]s,
/// its Pod's name a boxed string, and what few endpoints have (a
/// hostname, hints) in one box apart ([`EndpointExtra`]). That is 88
/// bytes an endpoint and no spare room; a node name costs nothing more, a
/// Pod name its own block. (As `String`s and `Vec`s it was 176 bytes,
/// plus a block for the address and one for each name.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// Its addresses, all of the slice's family (proxies use the first).
    pub addresses: Addresses,
    /// Ready / serving / terminating.
    pub conditions: EndpointConditions,
    /// The Pod its `targetRef` names (kind Pod), for DNS names of headless
    /// endpoints without a hostname (CoreDNS's `endpoint_pod_names`).
    pub pod_name: Option<Box<str>>,
    /// `nodeName`, for traffic policy Local ([`shared_name`]).
    pub node_name: Option<Arc<str>>,
    /// `zone`, for topology-aware routing ([`shared_name`]).
    pub zone: Option<Arc<str>>,
    /// Its hostname and hints; `None` when it has neither. Read and set
    /// through [`Endpoint::hostname`], [`Endpoint::set_hostname`],
    /// [`Endpoint::hint_zones`] and the like, which keep it `None` then
    /// (so that equal endpoints compare equal).
    pub extra: Option<Box<EndpointExtra>>,
}

/// What few endpoints have, boxed apart from [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointExtra {
    /// `hostname`, used by headless-Service DNS records.
    pub hostname: Option<Box<str>>,
    /// `hints.forZones[].name` ([`shared_name`]).
    pub hint_zones: Box<[Arc<str>]>,
    /// `hints.forNodes[].name` ([`shared_name`]).
    pub hint_nodes: Box<[Arc<str>]>,
}

impl Endpoint {
    /// `hostname`, used by headless-Service DNS records.
    pub fn hostname(&self) -> Option<&str> {
        self.extra.as_ref()?.hostname.as_deref()
    }

    /// `hints.forZones[].name`.
    pub fn hint_zones(&self) -> &[Arc<str>] {
        self.extra.as_ref().map_or(&[], |x| &x.hint_zones)
    }

    /// `hints.forNodes[].name`.
    pub fn hint_nodes(&self) -> &[Arc<str>] {
        self.extra.as_ref().map_or(&[], |x| &x.hint_nodes)
    }

    /// Sets the hostname (`None` removes it).
    pub fn set_hostname(&mut self, hostname: Option<Box<str>>) {
        // Conversions call this for every endpoint, most without one.
        if hostname.is_none() && self.extra.is_none() {
            return;
        }
        self.change_extra(|x| x.hostname = hostname);
    }

    /// Sets the hints (empty removes them).
    pub fn set_hints(&mut self, zones: Box<[Arc<str>]>, nodes: Box<[Arc<str>]>) {
        if zones.is_empty() && nodes.is_empty() && self.extra.is_none() {
            return;
        }
        self.change_extra(|x| {
            x.hint_zones = zones;
            x.hint_nodes = nodes;
        });
    }

    /// The endpoint with this hostname, for building one in a literal.
    #[must_use]
    pub fn with_hostname(mut self, hostname: &str) -> Self {
        self.set_hostname(Some(hostname.into()));
        self
    }

    fn change_extra(&mut self, change: impl FnOnce(&mut EndpointExtra)) {
        let extra = self.extra.get_or_insert_default();
        change(extra);
        if **extra == EndpointExtra::default() {
            self.extra = None;
        }
    }
}

/// One entry of a slice's `ports`: the number the endpoints of this slice
/// listen on for the Service port with the same name and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Name of the Service port this resolves (empty for an unnamed single port).
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// The port on the endpoints.
    pub port: u16,
}

/// A `discovery.k8s.io/v1` EndpointSlice, already attached to its Service
/// (via the `kubernetes.io/service-name` label).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSlice {
    /// The slice's own name.
    pub name: String,
    /// IPv4 or IPv6.
    pub address_type: AddressType,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Its ports.
    pub ports: Vec<EndpointPort>,
    /// The cluster its endpoints are in, when not the Service's own: each
    /// slice of a clusterset import comes from one exporting cluster.
    pub cluster: Option<String>,
    /// When the change that last moved its endpoints happened (Unix
    /// nanoseconds): the `endpoints.kubernetes.io/last-change-trigger-time`
    /// annotation the endpoint controllers set. Network programming latency
    /// is measured from it, as kube-proxy does.
    pub trigger_time_unix_nanos: Option<i64>,
}

impl EndpointSlice {
    /// How errors name this object.
    pub fn object_name(&self, service: &ServiceKey) -> String {
        let key = ServiceKey::new(&service.cluster, &service.namespace, &self.name);
        object_name("EndpointSlice", &key)
    }

    /// Gives back the room its vectors grew beyond what they hold.
    /// Conversions build slices by pushing, which leaves up to twice the
    /// room they use (16 endpoints' worth for 10):
    /// the endpoints are most of a large state, so the conversions of
    /// large states (an API server's or a file's objects, the agent's
    /// decoding) call this.
    pub fn shrink_to_fit(&mut self) {
        self.endpoints.shrink_to_fit();
        self.ports.shrink_to_fit();
    }

    /// The port endpoints of this slice use for the Service port `name`/`protocol`.
    pub fn port_for(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Checks addresses against the family, names and ports.
    pub fn validate(&self, service: &ServiceKey) -> Result<(), ValidationErrors> {
        let mut errs = Collector::new(self.object_name(service));
        if !is_dns_subdomain(&self.name) {
            errs.push(
                "metadata.name",
                format!("{:?} is not a DNS name", self.name),
            );
        }
        if let Some(c) = &self.cluster
            && !is_dns_label(c)
        {
            errs.push("cluster", format!("{c:?} is not a cluster id"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            // Field paths are made only for an error: most slices have none.
            if e.addresses.is_empty() {
                errs.push(
                    format!("endpoints[{i}].addresses"),
                    "at least one address is required",
                );
            }
            for (j, a) in e.addresses.iter().enumerate() {
                let family_ok = match self.address_type {
                    AddressType::IPv4 => a.is_ipv4(),
                    AddressType::IPv6 => a.is_ipv6(),
                };
                if !family_ok {
                    errs.push(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a} does not match addressType {:?}", self.address_type),
                    );
                }
                if a.is_unspecified() || a.is_multicast() {
                    errs.push(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a} is not usable"),
                    );
                }
            }
            if let Some(h) = e.hostname()
                && !is_dns_label(h)
            {
                errs.push(
                    format!("endpoints[{i}].hostname"),
                    format!("{h:?} is not a DNS label"),
                );
            }
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errs.push(format!("ports[{i}].port"), "must be between 1 and 65535");
            }
            if self.ports[..i]
                .iter()
                .any(|q| q.name == p.name && q.protocol == p.protocol)
            {
                errs.push(
                    format!("ports[{i}].name"),
                    format!("{:?}/{} appears twice", p.name, p.protocol),
                );
            }
        }
        errs.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice() -> EndpointSlice {
        EndpointSlice {
            name: "web-abc12".into(),
            address_type: AddressType::IPv4,
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.244.1.5".parse().expect("ip")].into(),
                    node_name: Some("node-a".into()),
                    ..Endpoint::default()
                }
                .with_hostname("web-0"),
            ],
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }
    }

    #[test]
    fn valid_slice() {
        let key = ServiceKey::new("default", "shop", "web");
        slice().validate(&key).expect("valid");
        assert_eq!(slice().port_for("http", Protocol::Tcp), Some(8080));
        assert_eq!(slice().port_for("http", Protocol::Udp), None);
    }

    #[test]
    fn family_mismatch_names_the_address() {
        let key = ServiceKey::new("default", "shop", "web");
        let mut s = slice();
        s.endpoints[0]
            .addresses
            .push("fd00::1".parse().expect("ip"));
        let e = s.validate(&key).expect_err("mixed family");
        assert_eq!(e.first().object, "EndpointSlice shop/web-abc12");
        assert_eq!(e.first().field, "endpoints[0].addresses[1]");
    }

    #[test]
    fn an_endpoint_is_compact() {
        // A million of them at 100,000 Services: every byte is a MB.
        #[cfg(target_pointer_width = "64")]
        {
            assert_eq!(size_of::<Endpoint>(), 88);
            assert_eq!(size_of::<Addresses>(), 24);
        }
    }

    #[test]
    fn addresses_hold_one_inline_and_read_as_a_slice() {
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let one = Addresses::from(vec![a]);
        assert!(matches!(one.0, AddressesRepr::One(_)));
        assert_eq!(one, Addresses::from(a));
        assert_eq!(one, [a].into_iter().collect::<Addresses>());
        assert_eq!(&*one, [a]);
        let mut two = one.clone();
        two.push(b);
        assert_eq!(&*two, [a, b]);
        assert_eq!(two, [a, b].into_iter().collect::<Addresses>());
        assert_ne!(two, one);
        assert_eq!(format!("{two:?}"), "[10.0.0.1, 10.0.0.2]");
        two.clear();
        assert!(two.is_empty());
        assert_eq!(two, Addresses::default());
        assert_eq!(Vec::<IpAddr>::new().into_iter().collect::<Addresses>(), two);
    }

    #[test]
    fn shared_names_are_one_allocation() {
        let a = shared_name("node-shared-test");
        let b = shared_name(&String::from("node-shared-test"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "node-shared-test");
        assert!(!Arc::ptr_eq(&a, &shared_name("node-other-test")));
    }

    #[test]
    fn names_no_one_holds_are_swept() {
        // More distinct names than the first sweep point, none of them
        // held: the table sweeps them instead of growing without end.
        for i in 0..3 * SharedNames::MIN_SWEEP {
            drop(shared_name(&format!("gone-{i}")));
        }
        let held = shared_name("held-across-sweeps");
        for i in 0..3 * SharedNames::MIN_SWEEP {
            drop(shared_name(&format!("gone-again-{i}")));
        }
        assert!(Arc::ptr_eq(&held, &shared_name("held-across-sweeps")));
        assert!(Arc::strong_count(&held) >= 2, "the table still holds it");
        // 6,144 names went through it; it never held more than twice the
        // few in use (other tests' names among them) plus the minimum.
        let len = TABLE_LEN.load(std::sync::atomic::Ordering::Relaxed);
        assert!(len <= 2 * SharedNames::MIN_SWEEP + 64, "{len} names held");
    }

    #[test]
    fn extras_are_none_when_empty() {
        let mut e = Endpoint::default().with_hostname("web-0");
        assert_eq!(e.hostname(), Some("web-0"));
        e.set_hints(["zone-a".into()].into(), Box::default());
        assert_eq!(e.hint_zones(), [Arc::from("zone-a")]);
        assert!(e.hint_nodes().is_empty());
        e.set_hostname(None);
        assert!(e.extra.is_some(), "the hints are still there");
        e.set_hints(Box::default(), Box::default());
        assert_eq!(e.extra, None);
        assert_eq!(e, Endpoint::default());
    }
}
