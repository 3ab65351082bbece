//! Request spans for the gRPC services (OpenTelemetry, etcd's
//! `--experimental-enable-distributed-tracing`).
//!
//! [`TraceLayer`] gives every gRPC call a server span named after its method
//! (`etcdserverpb.KV/Put`), the child of the caller's W3C `traceparent` metadata when it
//! sends one (extracted with the process's global propagator), and a `reply` span for
//! writing the response, from the handler's answer to the end of its body. The
//! request's context is current while the handler runs, so what the backend does
//! (a proposal, a call forwarded to the leader) continues the trace.
//!
//! Off unless the process calls [`enable`] (after installing a tracer provider); then
//! the layer passes requests through untouched, at the cost of one atomic load.
//! Requests the sampler drops are passed through the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue, global};
use tower::{Layer, Service};

/// The instrumentation scope of the request spans.
const SCOPE: &str = "concord-gateway";

static TRACER: OnceLock<global::BoxedTracer> = OnceLock::new();

/// Turns request spans on for this process, from the global tracer provider and
/// propagator, which must be installed first. There is no turning them off again.
pub fn enable() {
    TRACER.get_or_init(|| global::tracer(SCOPE));
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The request span layer; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService { inner }
    }
}

/// The service [`TraceLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for TraceService<S>
where
    S: Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(tracer) = TRACER.get() else {
            return TraceFuture::Plain {
                inner: self.inner.call(req),
            };
        };
        let cx = request_context(tracer, &req);
        if !cx.span().span_context().is_sampled() {
            return TraceFuture::Plain {
                inner: self.inner.call(req),
            };
        }
        let inner = {
            let _current = cx.clone().attach();
            self.inner.call(req)
        };
        TraceFuture::Traced {
            inner: inner.with_context(cx.clone()),
            cx: Some(cx),
        }
    }
}

/// The caller's context (from its `traceparent`, if any) with the request's span.
fn request_context<B>(tracer: &global::BoxedTracer, req: &http::Request<B>) -> Context {
    let parent = global::get_text_map_propagator(|p| p.extract(&Headers(req.headers())));
    let name = req.uri().path().trim_start_matches('/').to_string();
    let mut span = tracer
        .span_builder(name.clone())
        .with_kind(SpanKind::Server)
        .start_with_context(tracer, &parent);
    if span.is_recording() {
        let (service, method) = name.split_once('/').unwrap_or((&name, ""));
        span.set_attributes([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ]);
    }
    parent.with_span(span)
}

/// Request headers (gRPC metadata) as the propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`TraceService`].
    #[project = TraceFutureProj]
    pub enum TraceFuture<F> {
        /// Not traced: the inner future as it is.
        Plain { #[pin] inner: F },
        /// Traced: the inner future runs in the request's context.
        Traced {
            #[pin]
            inner: opentelemetry::context::WithContext<F>,
            cx: Option<Context>,
        },
    }
}

impl<F, E> Future for TraceFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.project() {
            TraceFutureProj::Plain { inner } => inner.poll(task),
            TraceFutureProj::Traced { inner, cx } => {
                let out = std::task::ready!(inner.poll(task));
                let Some(cx) = cx.take() else {
                    return Poll::Ready(out);
                };
                Poll::Ready(match out {
                    Ok(resp) => Ok(reply(cx, resp)),
                    Err(e) => {
                        cx.span().set_status(Status::error("request failed"));
                        cx.span().end();
                        Err(e)
                    }
                })
            }
        }
    }
}

/// Starts the `reply` span and hands the request's spans to the response body, which
/// ends them with the call's gRPC status.
fn reply(cx: Context, resp: Response) -> Response {
    let Some(tracer) = TRACER.get() else {
        return resp;
    };
    let span = tracer
        .span_builder("reply")
        .with_kind(SpanKind::Internal)
        .start_with_context(tracer, &cx);
    // An error answered before any message is a trailers-only response: the status
    // is in the headers.
    let code = grpc_status(resp.headers());
    let (parts, body) = resp.into_parts();
    let body = TracedBody {
        inner: body,
        spans: Some((cx, span)),
        code,
    };
    Response::from_parts(parts, Body::new(body))
}

fn grpc_status(h: &http::HeaderMap) -> Option<i64> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// gRPC codes that mark a server span as failed (OpenTelemetry's RPC conventions):
/// Unknown, DeadlineExceeded, Unimplemented, Internal, Unavailable, DataLoss.
fn server_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// A response body that ends the request's spans when it is done.
struct TracedBody {
    inner: Body,
    /// The request's context (its span) and the `reply` span, until ended.
    spans: Option<(Context, global::BoxedSpan)>,
    code: Option<i64>,
}

impl TracedBody {
    fn finish(&mut self, failure: Option<&'static str>) {
        let Some((cx, mut reply)) = self.spans.take() else {
            return;
        };
        let request = cx.span();
        if let Some(why) = failure {
            reply.set_status(Status::error(why));
            request.set_status(Status::error(why));
        }
        reply.end();
        if let Some(code) = self.code {
            request.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
            if failure.is_none() && server_error(code) {
                request.set_status(Status::error(format!("gRPC status {code}")));
            }
        }
        request.end();
    }
}

impl HttpBody for TracedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        task: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(task);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.code = Some(code);
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some("response body failed")),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        // The client went away before the end of the response.
        self.finish(Some("cancelled"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_extract_traceparent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let x = Headers(&h);
        assert_eq!(
            x.get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(x.keys(), vec!["traceparent"]);
        assert_eq!(x.get("tracestate"), None);
    }

    #[test]
    fn grpc_codes() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&h), Some(14));
        assert!(server_error(14) && server_error(13));
        assert!(!server_error(0) && !server_error(3) && !server_error(5));
    }
}
