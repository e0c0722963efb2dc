//! End-to-end helpers and the load generator.
//!
//! # Layout
//!
//! - [`loadgen`]: the load generator behind `loadgen` (`src/bin/loadgen.rs`)
//!   and `make bench`: device sessions, watchers, status churn and queries
//!   against real server nodes, measured with HDR histograms on one monotonic
//!   clock. `e2e/bench/run.sh` holds the benchmark profiles, `BENCHMARKS.md`
//!   at the root their figures.
//! - [`beating`]: a raw device on a heartbeat stream, for the tests and the
//!   `gateway-sessions` processes of the gateway deploy test.

pub mod beating;
pub mod loadgen;
