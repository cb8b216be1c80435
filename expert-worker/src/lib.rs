//! Expert worker: owns a slice of the routed experts and serves per-layer dispatch streams.
