//! Switchyard control plane.
pub mod k8s;
pub mod source;
