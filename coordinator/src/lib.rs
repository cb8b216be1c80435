//! The coordinator: client front door, request scheduling onto attention workers, expert
//! placement and membership.
