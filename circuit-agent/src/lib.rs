//! circuit-agent: a node-local circuit breaker in the kernel's fast path.
//!
//! - [`engine`]: the breakers, pure logic with an injected clock;
//! - [`kernel`]: loading, pinning and attaching the eBPF programs, typed map access;
//! - [`daemon`]: `attach`, which feeds kernel outcomes to the engine and its verdicts back;
//! - [`cli`]: the command line on top of all three.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod kernel;
pub mod time;
