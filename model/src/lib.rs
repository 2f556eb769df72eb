//! Switchyard's domain model.
//!
//! Everything that flows from a source (YAML files, the Kubernetes API, the
//! Docker engine) to an agent's data plane is expressed in these types:
//!
//! ```text
//!   source objects ──convert──▶ Service + EndpointSlice ──group──▶ ServiceState
//!                                   (validated here)                 (one resource
//!                                                                     per Service)
//! ```
//!
//! A [`ServiceState`] is the unit the control plane versions and streams: one
//! Service together with every endpoint slice that belongs to it. The types
//! are plain synchronous Rust with no gRPC, Kubernetes client or storage in
//! them, so sources, the wire protocol and the data planes all share one
//! vocabulary and one set of validation rules.

pub mod duration;
mod endpoints;
mod error;
mod service;

pub use endpoints::{
    AddressType, Addresses, Endpoint, EndpointConditions, EndpointExtra, EndpointPort,
    EndpointSlice, shared_name,
};
pub use error::{ValidationError, ValidationErrors};
pub use service::{
    CLUSTER_PREFERENCE_ANNOTATION, IpFamilies, IpFamily, IpFamilyPolicy, Locality,
    MIN_LOCAL_ENDPOINTS_ANNOTATION, NOT_PROXIED_LABELS, Protocol, Service, ServiceExport,
    ServiceKey, ServicePort, ServiceState, ServiceType, TargetPort, TrafficPolicy,
    affinity_timeout_or_default, is_dns_label, is_dns_subdomain, is_port_name,
};

/// The cluster id used when a deployment does not name one.
pub const DEFAULT_CLUSTER: &str = "default";

/// The cluster id under which the clusterset's imports (Services exported by
/// one or more clusters, merged; KEP-1645's ServiceImports) are kept. It is
/// not a valid cluster id for a source or an agent.
pub const CLUSTERSET: &str = "clusterset";

/// Longest `sessionAffinityConfig.clientIP.timeoutSeconds` Kubernetes accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

/// The timeout Kubernetes applies when ClientIP affinity names none (three hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
