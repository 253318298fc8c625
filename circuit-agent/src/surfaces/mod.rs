//! What operators touch: metrics and health over HTTP, the local control socket, and the
//! command line (in `crate::cli`).

mod accept;
pub mod control;
pub mod http;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otel;
