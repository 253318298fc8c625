//! OpenTelemetry export (cargo feature `otlp`, off by default): the agent's spans — one per
//! breaker lifecycle, with an event per transition — sent over OTLP/HTTP to a collector.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{Layer, registry::LookupSpan};

/// Flushes and stops the exporter when dropped (at exit).
pub struct OtlpGuard(SdkTracerProvider);

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(err) = self.0.shutdown() {
            eprintln!("warning: OTLP exporter shutdown: {err}");
        }
    }
}

/// A tracing layer exporting to `endpoint` (e.g. `http://collector:4318/v1/traces`).
pub fn layer<S>(endpoint: &str) -> anyhow::Result<(impl Layer<S>, OtlpGuard)>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_headers(Default::default())
        .build()
        .with_context(|| format!("cannot set up OTLP export to {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("circuit-agent")
                .build(),
        )
        .build();
    let tracer = provider.tracer("circuit-agent");
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        OtlpGuard(provider),
    ))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::TcpListener,
        sync::mpsc,
        time::Duration,
    };

    use tracing_subscriber::prelude::*;

    use super::*;

    /// A one-request HTTP server on loopback: returns the request line and headers it got.
    fn collector() -> (String, mpsc::Receiver<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                head.push(line.trim().to_owned());
            }
            let length: usize = head
                .iter()
                .find_map(|h| {
                    h.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            head.push(format!("body bytes: {}", body.len()));
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            tx.send(head).unwrap();
        });
        (endpoint, rx)
    }

    #[test]
    fn breaker_spans_are_exported_over_otlp_http() {
        let (endpoint, received) = collector();
        let (layer, guard) = layer(&endpoint).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("breaker", upstream = "10.0.0.2:8080");
            span.in_scope(|| tracing::info!(from = "CLOSED", to = "OPEN", "breaker transition"));
        });
        drop(guard); // shutdown flushes the batch
        let head = received.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(head[0], "POST /v1/traces HTTP/1.1");
        assert!(
            head.iter()
                .any(|h| h.eq_ignore_ascii_case("content-type: application/x-protobuf")),
            "{head:?}"
        );
        assert!(!head.last().unwrap().ends_with(": 0"), "{head:?}");
    }
}
