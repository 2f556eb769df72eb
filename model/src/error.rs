//! Validation errors that name the object and the field at fault.

use std::fmt;

/// One thing wrong with one object, located by a Kubernetes-style field path
/// such as `spec.ports[1].targetPort`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ValidationError {
    /// The object, as `Kind namespace/name` (for example `Service default/web`).
    pub object: String,
    /// The field path inside the object.
    pub field: String,
    /// What is wrong with the field.
    pub message: String,
}

impl ValidationError {
    /// Builds an error for `object` at `field`.
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in one object; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// The first error, which names the object.
    pub fn first(&self) -> &ValidationError {
        // Constructed only through `Collector::finish`, which never yields an empty list.
        &self.0[0]
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Gathers the errors of one object so that a user sees all of them at once.
#[derive(Debug)]
pub(crate) struct Collector {
    object: String,
    errors: Vec<ValidationError>,
}

impl Collector {
    pub(crate) fn new(object: String) -> Self {
        Self {
            object,
            errors: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors
            .push(ValidationError::new(self.object.clone(), field, message));
    }

    pub(crate) fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}
