//! Distributed tracing (etcd's `--experimental-enable-distributed-tracing` and the
//! other `--experimental-distributed-tracing-*` flags), with OpenTelemetry.
//!
//! Where spans start: the gateway's request span (`concord_gateway::trace`, the child
//! of a client's W3C `traceparent`) is current while the backend runs; a write's
//! `propose` span ([`propose`]) is its child, and consensus carries that context in
//! the Raft entry to the leader and to every member that applies it
//! (`concord_consensus`'s `raft.forward`, `raft.proposal`, `raft.commit` and
//! `raft.apply` spans). A call forwarded to the leader's client port carries it as
//! `traceparent` metadata ([`inject`]). Attributes name command kinds, indexes and
//! member ids, never keys or values.
//!
//! Off by default: without [`install`] no provider, no exporter and no request span
//! exist, so nothing downstream finds a sampled context and each hook costs one check.
//! [`install`] is for the binary only (library crates use the OpenTelemetry API).

use std::future::Future;

use concord_gateway::Result as ApiResult;
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::Injector;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, global};

/// The instrumentation scope of this crate's spans.
const SCOPE: &str = "concord-server";
/// etcd's unit for `--experimental-distributed-tracing-sampling-rate`.
pub const SAMPLES_PER_MILLION: u32 = 1_000_000;

/// Whether the caller's current context holds a sampled span (a traced request).
pub(crate) fn sampled() -> bool {
    Context::map_current(|cx| cx.span().span_context().is_sampled())
}

/// Runs a proposal of a `kind` command inside a `propose` span, a child of the current
/// context; the span ends with the proposal's outcome (its error code, never a text
/// that could hold user data).
pub(crate) async fn propose<T>(
    kind: &'static str,
    member_id: u64,
    proposal: impl Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let tracer = global::tracer(SCOPE);
    let parent = Context::current();
    let span = tracer
        .span_builder("propose")
        .with_kind(SpanKind::Internal)
        .with_attributes([
            KeyValue::new("command", kind),
            KeyValue::new("member_id", format!("{member_id:x}")),
        ])
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(span);
    let r = proposal.with_context(cx.clone()).await;
    if let Err(e) = &r {
        cx.span()
            .set_status(Status::error(e.code_name().unwrap_or("internal")));
    }
    cx.span().end();
    r
}

/// Puts the current trace context into gRPC metadata (`traceparent`), for a call this
/// member makes on its client's behalf.
pub(crate) fn inject(md: &mut tonic::metadata::MetadataMap) {
    global::get_text_map_propagator(|p| p.inject_context(&Context::current(), &mut Metadata(md)));
}

struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(k), Ok(v)) = (key, value) {
            self.0.insert(k, v);
        }
    }
}

/// The tracing settings, from etcd's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracingOptions {
    /// The OTLP/gRPC collector's URL (`http://host:port`).
    pub endpoint: String,
    /// `service.name` of every span.
    pub service_name: String,
    /// `service.instance.id`, if set (etcd: unique per member, no default).
    pub instance_id: Option<String>,
    /// Root spans sampled per million; a sampled (or unsampled) parent decides for
    /// its children, as etcd's parent-based sampler.
    pub samples_per_million: u32,
}

/// The installed tracer provider; [`Tracing::shutdown`] exports what is buffered.
#[derive(Debug)]
pub struct Tracing {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

/// Installs the global tracer provider (a batching OTLP/gRPC exporter, etcd's
/// sampler and resource) and the W3C TraceContext propagator, and turns on the
/// gateway's request spans. Call from within a Tokio runtime (the exporter's
/// channel lives on it), before the member starts.
pub fn install(opts: &TracingOptions) -> anyhow::Result<Tracing> {
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(opts.endpoint.clone())
        .build()?;
    let mut resource =
        opentelemetry_sdk::Resource::builder().with_service_name(opts.service_name.clone());
    if let Some(id) = &opts.instance_id {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", id.clone()));
    }
    let root = match opts.samples_per_million {
        0 => Sampler::AlwaysOff,
        n => Sampler::TraceIdRatioBased(f64::from(n) / f64::from(SAMPLES_PER_MILLION)),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .with_sampler(Sampler::ParentBased(Box::new(root)))
        .build();
    global::set_tracer_provider(provider.clone());
    global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    concord_gateway::trace::enable();
    Ok(Tracing { provider })
}

impl Tracing {
    /// Exports the spans still buffered and stops the exporter (blocks: call on a
    /// blocking thread).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_sampled_without_a_span() {
        assert!(!sampled());
        let mut md = tonic::metadata::MetadataMap::new();
        inject(&mut md);
        assert!(md.is_empty(), "no propagator, no context: nothing injected");
    }

    #[test]
    fn metadata_injector_writes_lowercase_keys() {
        let mut md = tonic::metadata::MetadataMap::new();
        Metadata(&mut md).set(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        assert_eq!(
            md.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
