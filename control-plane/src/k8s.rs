//! Conversion from Kubernetes API objects to the domain model.
