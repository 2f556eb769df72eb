//! The `file:PATH` source.
