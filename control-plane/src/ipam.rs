//! Address allocation: the cluster IPs of Services that name none (file and
//! Docker sources; in Kubernetes the API server allocates) and the
//! ClusterSet IPs of the clusterset's imports.
//!
//! ```text
//!  --service-cidr / --clusterset-cidr ─▶ Ranges (at most one per family; the first given is the primary)
//!  a Service's spec.ipFamilies + ipFamilyPolicy ─▶ families_for ─▶ the families it gets an address of
//!  per family: the keys that want an address + the addresses taken ─▶ allocate ─▶ one address per key
//!  per family, imports: the ServiceImports' recorded addresses ─▶ allocate_recorded ─▶ kept, or allocate
//! ```
//!
//! Every answer is a pure function of its inputs, so control planes given
//! the same objects give the same addresses without talking to each other,
//! whenever each started and whatever it held before (no state is kept
//! between runs: the per-replica state files of earlier versions are gone,
//! because two replicas with different histories could disagree).
//!
//! **The rule.** A key's probe starts at a hash of its identity
//! (SHA-256 of `cluster/namespace/name`, `clusterset/namespace/name` for an
//! import) in the range and goes forward one address at a time. Keys claim
//! in rounds: in round `d` every key still without an address tries the
//! address `d` after its start, and of keys trying the same free address in
//! the same round the smallest key wins. An address set explicitly
//! (another Service's `spec.clusterIP`, a ServiceImport's record) is never
//! handed out.
//!
//! **What stays put.** Cluster IPs of file and Docker Services (no API
//! server keeps a record of them): a Service keeps its address while it
//! exists unless (a) a new Service claims it in an earlier round (its probe
//! reaches the address in fewer steps; in as many, with a smaller key), or
//! (b) it had to probe past addresses held by other Services and one of
//! those goes (it then moves back towards its start). A Service at its
//! start moves only by (a) with a newcomer of the same start and a smaller
//! key. Both need two Services to hash onto nearby addresses: with N
//! Services in a range of M addresses a given Service is exposed with a
//! probability of about N/M (0.1% for 1,000 Services in the default /12).
//! A Service that must never move names its `spec.clusterIP`. ClusterSet IPs: the
//! ServiceImports written into every cluster are the record (as a
//! Service's `spec.clusterIP` is); an import whose record names an address
//! of a family in the range keeps it, whatever comes and goes, so (a) and
//! (b) only apply to an import's first build, before its record is written.
//! The record comes from the kube sources (`SourceState::service_imports`;
//! only ServiceImports with Switchyard's managed-by label count). When
//! clusters' records differ, the address recorded by the most clusters
//! wins, ties to the lowest cluster id, and each other cluster is named in
//! a `ClusterSetIPRecordMismatch` issue; when two imports record one
//! address, the one recorded by more clusters (then the smaller name) keeps
//! it. Every recorded address is reserved, so a fresh allocation never
//! takes one a cluster may still resolve to another import. An import gets
//! one ClusterSet IP per family of its exports that a `--clusterset-cidr`
//! serves (`NoClusterSetIP` when none).
//!
//! ```text
//!  per family: wanting keys + taken ─▶ allocate (rounds from hash starts) ─▶ addresses   (cluster IPs)
//!  per family: records (per import, per cluster) ─▶ majority, lowest cluster ─▶ one import per address
//!              ─▶ kept; the rest: allocate avoiding every record ─▶ ClusterSet IPs
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use switchyard_model::{IpFamily, IpFamilyPolicy, Service, ServiceKey};

/// Why an address could not be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// Every address of the range is taken.
    #[error("no free address left in {0}")]
    Exhausted(IpNet),
}

/// The ranges of one flag (`--service-cidr`, `--clusterset-cidr`): at most
/// one per family, as Kubernetes allows; the first one given is the primary
/// family (a single-stack Service's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges {
    ranges: Vec<IpNet>,
}

impl Ranges {
    /// The ranges given to `flag`; two of one family are refused, naming both.
    pub fn new(flag: &str, cidrs: &[IpNet]) -> Result<Self, String> {
        let mut ranges: Vec<IpNet> = Vec::new();
        for net in cidrs {
            let family = family_of(net);
            if let Some(other) = ranges.iter().find(|r| family_of(r) == family) {
                return Err(format!(
                    "{flag} {other} and {net} are both {family}: give at most one range per family \
                     (one IPv4 and one IPv6 for dual-stack)"
                ));
            }
            ranges.push(net.trunc());
        }
        Ok(Self { ranges })
    }

    /// The first range of each family, the rest ignored with an error
    /// logged (the flags are checked before: see `Args::check`).
    pub fn first_of_each(flag: &str, cidrs: &[IpNet]) -> Self {
        Self::new(flag, cidrs).unwrap_or_else(|e| {
            tracing::error!("{e}; using the first of each family");
            let mut ranges: Vec<IpNet> = Vec::new();
            for net in cidrs {
                if !ranges.iter().any(|r| family_of(r) == family_of(net)) {
                    ranges.push(net.trunc());
                }
            }
            Self { ranges }
        })
    }

    /// The range of `family`.
    pub fn get(&self, family: IpFamily) -> Option<IpNet> {
        self.ranges.iter().copied().find(|r| family_of(r) == family)
    }

    /// The primary family: the first range's.
    pub fn primary(&self) -> Option<IpFamily> {
        self.ranges.first().map(family_of)
    }

    /// The families there is a range of, the primary first.
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.ranges.iter().map(family_of)
    }

    /// Whether `ip` lies in the range of its family.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.get(IpFamily::of(ip)).is_some_and(|r| r.contains(ip))
    }
}

fn family_of(net: &IpNet) -> IpFamily {
    match net {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

/// Why a Service cannot have the families it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyError {
    /// The field at fault (`spec.ipFamilies[0]`, `spec.ipFamilyPolicy`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The families a Service without cluster IPs gets an address of, primary
/// first, as the API server decides from `spec.ipFamilies` and
/// `spec.ipFamilyPolicy` on a cluster whose service ranges are `ranges`
/// (given to `flag`): SingleStack (the default) is the first family asked
/// for, else the primary range's; PreferDualStack adds the other family
/// where there is a range of it; RequireDualStack needs both.
pub fn families_for(
    svc: &Service,
    ranges: &Ranges,
    flag: &str,
) -> Result<Vec<IpFamily>, FamilyError> {
    let refuse = |field: &str, message: String| FamilyError {
        field: field.to_owned(),
        message,
    };
    let primary = match (svc.requested_ip_families.first(), ranges.primary()) {
        (Some(f), _) if ranges.get(*f).is_none() => {
            return Err(refuse(
                "spec.ipFamilies[0]",
                format!("{f} is not served here: {flag} has no {f} range"),
            ));
        }
        (Some(f), _) => *f,
        (None, Some(f)) => f,
        (None, None) => {
            return Err(refuse(
                "spec.clusterIP",
                format!("no {flag} is configured to allocate from"),
            ));
        }
    };
    let other = primary.other();
    match svc.ip_family_policy.unwrap_or(IpFamilyPolicy::SingleStack) {
        IpFamilyPolicy::SingleStack => Ok(vec![primary]),
        IpFamilyPolicy::PreferDualStack if ranges.get(other).is_some() => Ok(vec![primary, other]),
        IpFamilyPolicy::PreferDualStack => Ok(vec![primary]),
        IpFamilyPolicy::RequireDualStack if ranges.get(other).is_some() => Ok(vec![primary, other]),
        IpFamilyPolicy::RequireDualStack => {
            let field = if svc.requested_ip_families.len() == 2 {
                "spec.ipFamilies[1]"
            } else {
                "spec.ipFamilyPolicy"
            };
            Err(refuse(
                field,
                format!(
                    "RequireDualStack needs an IPv4 and an IPv6 range; {flag} has no {other} range"
                ),
            ))
        }
    }
}

/// Where `key`'s probe starts, before it is reduced to a range: the first
/// 16 bytes of SHA-256 of its `cluster/namespace/name`. A published
/// function, so control planes of different versions agree.
pub fn start_of(key: &ServiceKey) -> u128 {
    let digest = Sha256::digest(key.to_string().as_bytes());
    let mut h = [0u8; 16];
    h.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(h)
}

/// The most rounds [`allocate`] probes: a nearly full range fails rather
/// than scanning forever.
const MAX_ROUNDS: u128 = 1 << 20;

/// The usable offsets of `range`: `FIRST..FIRST + span`. The network
/// address, offset 1 (left for the API service, as Kubernetes does) and
/// the last address (IPv4's broadcast) are never handed out.
const FIRST: u128 = 2;

fn span_of(range: IpNet) -> u128 {
    let host_bits = u32::from(range.max_prefix_len() - range.prefix_len()).min(64);
    let size: u128 = 1u128 << host_bits;
    size.saturating_sub(3)
}

/// The offset of `ip` in `range`'s usable addresses, if it is one.
fn slot_of(range: IpNet, span: u128, ip: &IpAddr) -> Option<u128> {
    let offset = match (range.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(*a).checked_sub(u32::from(n))?),
        (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(*a).checked_sub(u128::from(n))?,
        _ => return None,
    };
    (FIRST..FIRST + span)
        .contains(&offset)
        .then_some(offset - FIRST)
}

fn ip_at(range: IpNet, slot: u128) -> IpAddr {
    let offset = FIRST + slot;
    match range.network() {
        IpAddr::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(
            (u128::from(u32::from(n)) + offset) as u32,
        )),
        IpAddr::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n) + offset)),
    }
}

/// An address of `range` for each of `wanting`, never one of `taken`, by the
/// rule of the module docs: a pure function of the set of keys (their
/// order here does not matter; a key given twice gets one address) and of
/// `taken`. Returns the answer of each key, in input order.
pub fn allocate(
    range: IpNet,
    wanting: &[&ServiceKey],
    taken: &HashSet<IpAddr>,
) -> Vec<Result<IpAddr, IpamError>> {
    let span = span_of(range);
    let mut order: Vec<usize> = (0..wanting.len()).collect();
    order.sort_by(|a, b| wanting[*a].cmp(wanting[*b]));
    order.dedup_by(|a, b| wanting[*a] == wanting[*b]);
    let mut used: HashSet<u128> = taken
        .iter()
        .filter_map(|ip| slot_of(range, span, ip))
        .collect();
    let mut free = span.saturating_sub(used.len() as u128);
    let starts: HashMap<usize, u128> = order
        .iter()
        .map(|i| {
            (
                *i,
                if span == 0 {
                    0
                } else {
                    start_of(wanting[*i]) % span
                },
            )
        })
        .collect();
    let mut slots: HashMap<&ServiceKey, u128> = HashMap::with_capacity(order.len());
    let mut pending = order;
    let mut round: u128 = 0;
    while !pending.is_empty() && free > 0 && round < span.min(MAX_ROUNDS) {
        // Keys in key order: of two trying one address this round, the
        // smaller key claims it first.
        pending.retain(|i| {
            let slot = (starts[i] + round) % span;
            if used.insert(slot) {
                slots.insert(wanting[*i], slot);
                free -= 1;
                false
            } else {
                true
            }
        });
        round += 1;
    }
    wanting
        .iter()
        .map(|k| {
            slots
                .get(k)
                .map(|s| ip_at(range, *s))
                .ok_or(IpamError::Exhausted(range))
        })
        .collect()
}

/// What one cluster's ServiceImport records for an import, in one family:
/// (the cluster, the address). Only addresses of the range count.
pub type Recorded<'a> = (&'a str, IpAddr);

/// A record that could not be kept as it is, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordNote {
    /// Clusters recorded different addresses for `key`: `kept` (recorded by
    /// most clusters, ties to the one recorded by the lowest cluster id)
    /// is used; `differing` lists the others' (cluster, address).
    Disagrees {
        /// The import.
        key: ServiceKey,
        /// The address used.
        kept: IpAddr,
        /// The clusters whose record names another.
        differing: Vec<(String, IpAddr)>,
    },
    /// The address recorded for `key` is recorded for `holder` too, which
    /// keeps it (recorded by more clusters, or the smaller key): `key` gets
    /// another.
    HeldByAnother {
        /// The import that gets another address.
        key: ServiceKey,
        /// The address both records name.
        ip: IpAddr,
        /// The import that keeps it.
        holder: ServiceKey,
        /// The clusters whose record for `key` names it.
        clusters: Vec<String>,
    },
}

/// Addresses of `range` for the imports `wanting`, honouring the record:
/// each import keeps the address its ServiceImports record in this family
/// (`recorded`, by import; see [`RecordNote::Disagrees`] when they differ,
/// and [`RecordNote::HeldByAnother`] when two imports record one address);
/// the others are allocated as [`allocate`] does, never taking an address of
/// `reserved` (every address any record names: a cluster may still resolve
/// it to its import until the record is rewritten). A pure function of its
/// inputs. Returns the answer of each import, in input order, and the notes.
pub fn allocate_recorded(
    range: IpNet,
    wanting: &[&ServiceKey],
    recorded: &BTreeMap<&ServiceKey, Vec<Recorded<'_>>>,
    reserved: &HashSet<IpAddr>,
) -> (Vec<Result<IpAddr, IpamError>>, Vec<RecordNote>) {
    let mut notes = Vec::new();
    // Each import's choice among its records: (address, how many record it).
    let mut chosen: BTreeMap<&ServiceKey, (IpAddr, usize)> = BTreeMap::new();
    let wanted: HashSet<&ServiceKey> = wanting.iter().copied().collect();
    for (key, records) in recorded {
        if !wanted.contains(key) {
            continue;
        }
        let mut by_ip: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
        for (cluster, ip) in records.iter().filter(|(_, ip)| range.contains(ip)) {
            by_ip.entry(*ip).or_default().push(cluster);
        }
        for clusters in by_ip.values_mut() {
            clusters.sort_unstable();
            clusters.dedup();
        }
        let Some((ip, clusters)) = by_ip
            .iter()
            .max_by(|(_, a), (_, b)| a.len().cmp(&b.len()).then(b[0].cmp(a[0])))
        else {
            continue;
        };
        if by_ip.len() > 1 {
            notes.push(RecordNote::Disagrees {
                key: (*key).clone(),
                kept: *ip,
                differing: by_ip
                    .iter()
                    .filter(|(other, _)| *other != ip)
                    .flat_map(|(other, cs)| cs.iter().map(|c| ((*c).to_owned(), *other)))
                    .collect(),
            });
        }
        chosen.insert(key, (*ip, clusters.len()));
    }
    // One address, one import: the one recorded by more clusters, then the
    // smaller key.
    let mut holders: BTreeMap<IpAddr, &ServiceKey> = BTreeMap::new();
    for (key, (ip, count)) in &chosen {
        match holders.get(ip) {
            Some(holder) if chosen[holder].1 >= *count => {}
            _ => {
                holders.insert(*ip, key);
            }
        }
    }
    for (key, (ip, _)) in &chosen {
        let holder = holders[ip];
        if holder != *key {
            notes.push(RecordNote::HeldByAnother {
                key: (*key).clone(),
                ip: *ip,
                holder: holder.clone(),
                clusters: recorded[key]
                    .iter()
                    .filter(|(_, r)| r == ip)
                    .map(|(c, _)| (*c).to_owned())
                    .collect(),
            });
        }
    }
    let fresh: Vec<&ServiceKey> = wanting
        .iter()
        .copied()
        .filter(|k| chosen.get(k).is_none_or(|(ip, _)| holders[ip] != *k))
        .collect();
    let mut taken = reserved.clone();
    taken.extend(holders.keys().copied());
    let allocated: HashMap<&ServiceKey, Result<IpAddr, IpamError>> = fresh
        .iter()
        .copied()
        .zip(allocate(range, &fresh, &taken))
        .collect();
    let out = wanting
        .iter()
        .map(|k| match chosen.get(k) {
            Some((ip, _)) if holders[ip] == *k => Ok(*ip),
            _ => allocated
                .get(k)
                .cloned()
                .unwrap_or(Err(IpamError::Exhausted(range))),
        })
        .collect();
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ServiceKey {
        ServiceKey::new("default", "ns", n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ok(r: &[Result<IpAddr, IpamError>]) -> Vec<IpAddr> {
        r.iter().map(|r| *r.as_ref().expect("allocated")).collect()
    }

    #[test]
    fn the_answer_depends_on_the_set_not_on_the_order_or_the_history() {
        let range = net("10.96.0.0/24");
        let owned: Vec<ServiceKey> = (0..120).map(|i| key(&format!("s{i}"))).collect();
        let keys: Vec<&ServiceKey> = owned.iter().collect();
        let forward = ok(&allocate(range, &keys, &HashSet::new()));
        let distinct: HashSet<&IpAddr> = forward.iter().collect();
        assert_eq!(distinct.len(), 120, "distinct addresses");
        assert!(forward.iter().all(|a| range.contains(a)));
        let mut reversed = keys.clone();
        reversed.reverse();
        let mut backward = ok(&allocate(range, &reversed, &HashSet::new()));
        backward.reverse();
        assert_eq!(forward, backward, "input order does not matter");
        // Two replicas, one of which saw every prefix of the set first:
        // no history, the same answer.
        for n in [1, 30, 119] {
            let _ = allocate(range, &keys[..n], &HashSet::new());
        }
        assert_eq!(ok(&allocate(range, &keys, &HashSet::new())), forward);
    }

    #[test]
    fn a_collision_goes_to_the_smaller_key_and_the_other_probes_forward() {
        // A range of 5 usable addresses (offsets 2..=6): find two keys with
        // the same start.
        let range = net("10.96.0.0/29");
        let span = span_of(range);
        assert_eq!(span, 5);
        let owned: Vec<ServiceKey> = (0..50).map(|i| key(&format!("k{i}"))).collect();
        let (a, b) = owned
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                owned[i + 1..]
                    .iter()
                    .find(|b| start_of(a) % span == start_of(b) % span)
                    .map(|b| (a, b))
            })
            .expect("two keys with one start");
        let (small, large) = if a < b { (a, b) } else { (b, a) };
        let start = ip_at(range, start_of(small) % span);
        let next = ip_at(range, (start_of(small) % span + 1) % span);
        let out = ok(&allocate(range, &[large, small], &HashSet::new()));
        assert_eq!(out, [next, start], "the smaller key keeps the start");
        // An address set explicitly is never handed out: both move on.
        let taken: HashSet<IpAddr> = [start].into();
        let out = ok(&allocate(range, &[small, large], &taken));
        assert_eq!(out[0], next);
        assert!(!out.contains(&start));
    }

    #[test]
    fn a_service_at_its_start_stays_while_others_come_and_go() {
        let range = net("10.96.0.0/16");
        let stay = key("stays");
        let alone = ok(&allocate(range, &[&stay], &HashSet::new()))[0];
        let owned: Vec<ServiceKey> = (0..300).map(|i| key(&format!("other{i}"))).collect();
        for n in [10, 100, 300] {
            let mut keys: Vec<&ServiceKey> = owned[..n].iter().collect();
            keys.push(&stay);
            let out = ok(&allocate(range, &keys, &HashSet::new()));
            assert_eq!(out[n], alone, "with {n} others");
        }
    }

    #[test]
    fn exhaustion_is_reported_and_deterministic() {
        let range = net("10.96.0.0/29"); // offsets 2..=6
        let taken: HashSet<IpAddr> = [ip("10.96.0.2"), ip("192.0.2.1")].into();
        let owned: Vec<_> = (0..6).map(|i| key(&format!("s{i}"))).collect();
        let keys: Vec<&ServiceKey> = owned.iter().collect();
        let out = allocate(range, &keys, &taken);
        let given: Vec<IpAddr> = out
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(given.len(), 4, "five usable, one taken: {out:?}");
        assert!(!given.contains(&ip("10.96.0.2")));
        assert!(
            given
                .iter()
                .all(|a| (ip("10.96.0.2")..=ip("10.96.0.6")).contains(a))
        );
        assert_eq!(out.iter().filter(|r| r.is_err()).count(), 2);
        assert_eq!(allocate(range, &keys, &taken), out);
        // A range with no usable address.
        let tiny = net("10.96.0.0/31");
        assert_eq!(
            allocate(tiny, &keys[..1], &HashSet::new()),
            [Err(IpamError::Exhausted(tiny))]
        );
    }

    #[test]
    fn ipv6_ranges_allocate_too() {
        let range = net("fd00:96::/108");
        let owned: Vec<_> = (0..50).map(|i| key(&format!("s{i}"))).collect();
        let keys: Vec<&ServiceKey> = owned.iter().collect();
        let out = ok(&allocate(range, &keys, &HashSet::new()));
        assert!(out.iter().all(|a| a.is_ipv6() && range.contains(a)));
    }

    #[test]
    fn ranges_allow_one_per_family_and_the_first_is_primary() {
        let r = Ranges::new("--service-cidr", &[net("fd00::/108"), net("10.96.0.0/12")])
            .expect("one of each");
        assert_eq!(r.primary(), Some(IpFamily::V6));
        assert_eq!(
            r.families().collect::<Vec<_>>(),
            [IpFamily::V6, IpFamily::V4]
        );
        assert!(r.contains(&ip("10.100.0.1")) && !r.contains(&ip("10.200.0.1")));
        let e = Ranges::new(
            "--service-cidr",
            &[net("10.96.0.0/12"), net("10.112.0.0/12")],
        )
        .expect_err("two IPv4");
        assert!(
            e.contains("--service-cidr 10.96.0.0/12 and 10.112.0.0/12 are both IPv4"),
            "{e}"
        );
        let lenient = Ranges::first_of_each(
            "--service-cidr",
            &[net("10.96.0.0/12"), net("10.112.0.0/12")],
        );
        assert_eq!(lenient.get(IpFamily::V4), Some(net("10.96.0.0/12")));
    }

    #[test]
    fn families_follow_the_policy_as_the_api_server_does() {
        use IpFamily::{V4, V6};
        use IpFamilyPolicy::{PreferDualStack, RequireDualStack, SingleStack};
        let v4 = Ranges::new("--service-cidr", &[net("10.96.0.0/12")]).expect("ranges");
        let dual = Ranges::new("--service-cidr", &[net("10.96.0.0/12"), net("fd00::/108")])
            .expect("ranges");
        let v6_first =
            Ranges::new("--service-cidr", &[net("fd00::/108"), net("10.96.0.0/12")]).expect("r");
        type Case<'a> = (
            &'a str,
            &'a [IpFamily],
            Option<IpFamilyPolicy>,
            &'a Ranges,
            Result<&'a [IpFamily], &'a str>,
        );
        let cases: [Case<'_>; 12] = [
            ("default: the primary", &[], None, &dual, Ok(&[V4])),
            ("default, IPv6 primary", &[], None, &v6_first, Ok(&[V6])),
            (
                "SingleStack IPv6",
                &[V6],
                Some(SingleStack),
                &dual,
                Ok(&[V6]),
            ),
            (
                "IPv6 on IPv4 only",
                &[V6],
                None,
                &v4,
                Err("spec.ipFamilies[0]"),
            ),
            (
                "Prefer on dual",
                &[],
                Some(PreferDualStack),
                &dual,
                Ok(&[V4, V6]),
            ),
            (
                "Prefer, IPv6 first",
                &[V6],
                Some(PreferDualStack),
                &dual,
                Ok(&[V6, V4]),
            ),
            (
                "Prefer on single",
                &[],
                Some(PreferDualStack),
                &v4,
                Ok(&[V4]),
            ),
            (
                "Require on dual",
                &[],
                Some(RequireDualStack),
                &dual,
                Ok(&[V4, V6]),
            ),
            (
                "Require, IPv6 first",
                &[V6, V4],
                Some(RequireDualStack),
                &v6_first,
                Ok(&[V6, V4]),
            ),
            (
                "Require on single",
                &[],
                Some(RequireDualStack),
                &v4,
                Err("spec.ipFamilyPolicy"),
            ),
            (
                "Require both on single",
                &[V4, V6],
                Some(RequireDualStack),
                &v4,
                Err("spec.ipFamilies[1]"),
            ),
            (
                "no range at all",
                &[],
                None,
                &Ranges::default(),
                Err("spec.clusterIP"),
            ),
        ];
        for (what, families, policy, ranges, want) in cases {
            let svc = Service {
                requested_ip_families: families.to_vec(),
                ip_family_policy: policy,
                ..Service::new(key("web"))
            };
            let got = families_for(&svc, ranges, "--service-cidr");
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w), "{what}"),
                Err(field) => {
                    let e = got.expect_err(what);
                    assert_eq!(e.field, field, "{what}: {e:?}");
                    assert!(e.message.contains("--service-cidr"), "{what}: {e:?}");
                }
            }
        }
    }

    #[test]
    fn the_record_is_kept_and_disagreements_go_to_the_majority_then_the_lowest_cluster() {
        let range = net("10.112.0.0/16");
        let (web, db, new) = (key("web"), key("db"), key("new"));
        let outside = ip("10.200.0.1");
        let mut recorded: BTreeMap<&ServiceKey, Vec<Recorded<'_>>> = BTreeMap::new();
        // web: two clusters say .5, one says .9: .5. An address outside the
        // range does not count.
        recorded.insert(
            &web,
            vec![
                ("west", ip("10.112.0.9")),
                ("east", ip("10.112.0.5")),
                ("north", ip("10.112.0.5")),
                ("south", outside),
            ],
        );
        // db: a tie, east's wins (the lowest cluster id).
        recorded.insert(
            &db,
            vec![("west", ip("10.112.0.7")), ("east", ip("10.112.0.8"))],
        );
        let reserved: HashSet<IpAddr> = recorded
            .values()
            .flatten()
            .map(|(_, ip)| *ip)
            .filter(|ip| range.contains(ip))
            .collect();
        let (out, notes) = allocate_recorded(range, &[&web, &db, &new], &recorded, &reserved);
        let out = ok(&out);
        assert_eq!(out[..2], [ip("10.112.0.5"), ip("10.112.0.8")]);
        assert!(
            !reserved.contains(&out[2]),
            "a fresh one avoids every record"
        );
        assert_eq!(
            notes,
            [
                RecordNote::Disagrees {
                    key: db.clone(),
                    kept: ip("10.112.0.8"),
                    differing: vec![("west".into(), ip("10.112.0.7"))],
                },
                RecordNote::Disagrees {
                    key: web.clone(),
                    kept: ip("10.112.0.5"),
                    differing: vec![("west".into(), ip("10.112.0.9"))],
                },
            ]
        );
        // Without the record the answer is the pure allocation's, and the
        // same on every replica.
        let (bare, _) = allocate_recorded(range, &[&web, &db], &BTreeMap::new(), &HashSet::new());
        assert_eq!(bare, allocate(range, &[&web, &db], &HashSet::new()));
    }

    #[test]
    fn two_imports_recording_one_address_leave_it_to_the_better_recorded() {
        let range = net("10.112.0.0/16");
        let (a, b, c) = (key("a"), key("b"), key("c"));
        let same = ip("10.112.0.5");
        let mut recorded: BTreeMap<&ServiceKey, Vec<Recorded<'_>>> = BTreeMap::new();
        recorded.insert(&a, vec![("east", same)]);
        recorded.insert(&b, vec![("east", same), ("west", same)]);
        let reserved: HashSet<IpAddr> = [same].into();
        let (out, notes) = allocate_recorded(range, &[&a, &b], &recorded, &reserved);
        let out = ok(&out);
        assert_eq!(out[1], same, "b is recorded by two clusters");
        assert_ne!(out[0], same);
        assert_eq!(
            notes,
            [RecordNote::HeldByAnother {
                key: a.clone(),
                ip: same,
                holder: b.clone(),
                clusters: vec!["east".into()],
            }]
        );
        // A tie goes to the smaller key.
        recorded.insert(&c, vec![("west", same)]);
        let (out, _) = allocate_recorded(range, &[&c, &a], &recorded, &reserved);
        assert_eq!(ok(&out)[1], same);
        // An import not wanting an address keeps nothing, but its record
        // stays reserved.
        let (out, notes) = allocate_recorded(range, &[&c], &recorded, &reserved);
        assert_eq!(ok(&out), [same], "a and b want none");
        assert!(notes.is_empty());
        let mut only_a = recorded.clone();
        only_a.remove(&c);
        let (out, _) = allocate_recorded(range, &[&c], &only_a, &reserved);
        assert_ne!(ok(&out)[0], same, "reserved for a and b");
    }
}
