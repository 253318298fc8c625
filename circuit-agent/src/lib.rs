//! circuit-agent: a node-local circuit breaker in the kernel's fast path.
//!
//! - [`engine`]: the breakers, pure logic with an injected clock;
//! - [`kernel`]: loading, pinning and attaching the eBPF programs, typed map access;
//! - [`daemon`]: `attach`, which feeds kernel outcomes to the engine and its verdicts back;
//! - [`surfaces`]: metrics, health, the control socket; [`cli`]: the command line.
//! - [`config`]: the TOML configuration; [`doctor`]: what this kernel supports.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub use circuit_engine as engine;
pub mod kernel;
pub mod lock;
pub mod ports;
pub mod surfaces;
pub mod time;
