//! Cluster IP allocation for Services that name none (file and Docker sources;
//! in Kubernetes the API server allocates).
//!
//! An address is derived from a hash of the Service's key, probing forward on
//! collision, and then remembered: sticky in memory and, with a state file,
//! across restarts. So a Service keeps its IP while it exists, whatever is
//! added around it, and two control planes given the same objects and no
//! collisions agree without talking to each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use switchyard_model::ServiceKey;

/// Why an allocation failed or the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Every address of the range is taken.
    #[error("no free address left in {0}")]
    Exhausted(IpNet),
    /// The state file could not be written.
    #[error("writing {path}: {source}")]
    Persist {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Hands out cluster IPs from one range.
#[derive(Debug)]
pub struct ClusterIpAllocator {
    range: IpNet,
    assigned: BTreeMap<ServiceKey, IpAddr>,
    state_file: Option<PathBuf>,
}

impl ClusterIpAllocator {
    /// An allocator over `range`, loading earlier assignments from
    /// `state_file` when it exists (a broken file is ignored with a warning).
    pub fn new(range: IpNet, state_file: Option<PathBuf>) -> Self {
        let mut assigned = BTreeMap::new();
        if let Some(path) = &state_file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, IpAddr>>(&bytes) {
                    Ok(map) => {
                        for (k, ip) in map {
                            if let Ok(key) = k.parse::<ServiceKey>()
                                && range.contains(&ip)
                            {
                                assigned.insert(key, ip);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable cluster IP state")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable cluster IP state")
                }
            }
        }
        Self {
            range,
            assigned,
            state_file,
        }
    }

    /// Assigns addresses to `wanting` (Services without a cluster IP), never
    /// handing out one of `taken` (addresses set explicitly). Forgets
    /// Services no longer present and persists when anything changed.
    /// Returns the address (or the error) of each Service, in input order.
    pub fn assign(
        &mut self,
        wanting: &[&ServiceKey],
        taken: &HashSet<IpAddr>,
    ) -> Vec<Result<IpAddr, IpamError>> {
        let wanted: HashSet<&ServiceKey> = wanting.iter().copied().collect();
        let before = self.assigned.len();
        self.assigned
            .retain(|k, ip| wanted.contains(k) && !taken.contains(ip));
        let mut dirty = self.assigned.len() != before;
        let mut used: HashSet<IpAddr> = taken.clone();
        used.extend(self.assigned.values().copied());
        // New Services are placed in key order, so the same set of objects
        // gives the same addresses on every control plane.
        let mut fresh: Vec<&ServiceKey> = wanting
            .iter()
            .copied()
            .filter(|k| !self.assigned.contains_key(*k))
            .collect();
        fresh.sort();
        let mut failed = HashMap::new();
        for key in fresh {
            match self.probe(key, &used) {
                Ok(ip) => {
                    used.insert(ip);
                    self.assigned.insert(key.clone(), ip);
                    dirty = true;
                }
                Err(e) => {
                    failed.insert(key, e);
                }
            }
        }
        if dirty && let Err(e) = self.persist() {
            tracing::warn!(error = %e, "cluster IPs stay in memory only");
        }
        wanting
            .iter()
            .map(|k| match self.assigned.get(*k) {
                Some(ip) => Ok(*ip),
                None => Err(failed
                    .remove(*k)
                    .unwrap_or(IpamError::Exhausted(self.range))),
            })
            .collect()
    }

    /// Usable offsets are 1..size-1 (the network and, for IPv4, the broadcast
    /// address are never handed out); offset 1 is left for the API service,
    /// as Kubernetes does.
    fn probe(&self, key: &ServiceKey, used: &HashSet<IpAddr>) -> Result<IpAddr, IpamError> {
        let host_bits = u32::from(self.range.max_prefix_len() - self.range.prefix_len()).min(64);
        let size: u128 = 1u128 << host_bits;
        if size <= 4 {
            return Err(IpamError::Exhausted(self.range));
        }
        let first = 2u128;
        let span = size - 3;
        let digest = Sha256::digest(key.to_string().as_bytes());
        let mut h = [0u8; 16];
        h.copy_from_slice(&digest[..16]);
        let start = u128::from_be_bytes(h) % span;
        // Bounded probing: a nearly full range fails rather than scanning forever.
        for i in 0..span.min(1 << 20) {
            let offset = first + (start + i) % span;
            let ip = offset_ip(self.range.network(), offset);
            if !used.contains(&ip) {
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(self.range))
    }

    fn persist(&self) -> Result<(), IpamError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let map: BTreeMap<String, IpAddr> = self
            .assigned
            .iter()
            .map(|(k, ip)| (k.to_string(), *ip))
            .collect();
        let err = |source| IpamError::Persist {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let body = serde_json::to_vec_pretty(&map).map_err(|e| err(std::io::Error::other(e)))?;
        write_durably(path, &body).map_err(err)
    }
}

/// Replaces `path` with `body` so that a crash at any point leaves either
/// the old or the new file, never a torn one: write a temporary file beside
/// it, fsync it, rename it over `path`, fsync the directory (the rename is
/// only durable once the directory entry is).
pub fn write_durably(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn offset_ip(network: IpAddr, offset: u128) -> IpAddr {
    match network {
        IpAddr::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(
            (u128::from(u32::from(n)) + offset) as u32,
        )),
        IpAddr::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n) + offset)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ServiceKey {
        ServiceKey::new("default", "ns", n)
    }

    #[test]
    fn stable_across_restarts_and_additions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cluster-ips.json");
        let range: IpNet = "10.96.0.0/24".parse().expect("cidr");
        let mut a = ClusterIpAllocator::new(range, Some(file.clone()));
        let b = key("b");
        let first = a.assign(&[&b], &HashSet::new());
        let ip_b = *first[0].as_ref().expect("allocated");
        assert!(range.contains(&ip_b));
        // Many more Services later: b keeps its address.
        let owned: Vec<_> = (0..200)
            .map(|i| key(&format!("s{i}")))
            .chain([key("b")])
            .collect();
        let many: Vec<&ServiceKey> = owned.iter().collect();
        let all = a.assign(&many, &HashSet::new());
        let ips: HashSet<_> = all
            .iter()
            .map(|r| *r.as_ref().expect("allocated"))
            .collect();
        assert_eq!(ips.len(), 201, "distinct addresses");
        assert_eq!(
            *all[200].as_ref().expect("allocated"),
            ip_b,
            "b keeps its address"
        );
        // A restart reads the same assignment back.
        let mut again = ClusterIpAllocator::new(range, Some(file));
        let second = again.assign(&many, &HashSet::new());
        assert_eq!(
            all.iter()
                .map(|r| r.as_ref().ok().copied())
                .collect::<Vec<_>>(),
            second
                .iter()
                .map(|r| r.as_ref().ok().copied())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_state_file_is_replaced_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cluster-ips.json");
        std::fs::write(&file, b"{\"default/ns/old\": \"10.96.0.9\"}").expect("seed");
        let range: IpNet = "10.96.0.0/24".parse().expect("cidr");
        let mut a = ClusterIpAllocator::new(range, Some(file.clone()));
        let k = key("new");
        a.assign(&[&k], &HashSet::new());
        let body: BTreeMap<String, IpAddr> =
            serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("whole JSON");
        assert_eq!(body.keys().collect::<Vec<_>>(), ["default/ns/new"]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("cluster-ips.json")]);
    }

    #[test]
    fn explicit_addresses_are_never_handed_out_and_exhaustion_is_reported() {
        let range: IpNet = "10.96.0.0/29".parse().expect("cidr"); // offsets 2..=6
        let mut a = ClusterIpAllocator::new(range, None);
        let taken: HashSet<IpAddr> = ["10.96.0.2".parse().expect("ip")].into();
        let owned: Vec<_> = (0..5).map(|i| key(&format!("s{i}"))).collect();
        let keys: Vec<&ServiceKey> = owned.iter().collect();
        let out = a.assign(&keys, &taken);
        let ok: Vec<_> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 4);
        assert!(!ok.contains(&&"10.96.0.2".parse::<IpAddr>().expect("ip")));
        assert!(
            out.iter()
                .any(|r| matches!(r, Err(IpamError::Exhausted(_))))
        );
    }
}
