//! loom models (see the submodules).
