//! Request metrics of the gRPC services, from one tower layer ([`GrpcMetricsLayer`]):
//! go-grpc-prometheus's family as etcd exports it (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total`, and with `--metrics extensive`
//! `grpc_server_handling_seconds`; labels `grpc_type grpc_service grpc_method
//! grpc_code`), etcd's `etcd_server_client_requests_total{type, client_api_version}`
//! and the bytes of gRPC messages to and from clients
//! (`etcd_network_client_grpc_{received,sent}_bytes_total`).
//!
//! Recorded through the `metrics` facade: without an installed recorder (a library
//! user, a unit test) every handle is a no-op. As go-grpc-prometheus does for the
//! services etcd registers it with, the methods of etcd's own services are registered
//! at zero when the layer is built (every code of `handled_total`), so dashboards see
//! them before the first call; the Lock and Election recipes appear once called.
//!
//! Messages are counted from the gRPC length-prefixed framing of the request and
//! response bodies, the code from the `grpc-status` trailer (or header, for a
//! trailers-only answer); a stream the client abandons counts as `Canceled`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics::{Counter, Histogram, counter, describe_counter, describe_histogram};

pub const STARTED: &str = "grpc_server_started_total";
pub const HANDLED: &str = "grpc_server_handled_total";
pub const MSG_RECEIVED: &str = "grpc_server_msg_received_total";
pub const MSG_SENT: &str = "grpc_server_msg_sent_total";
pub const HANDLING: &str = "grpc_server_handling_seconds";
pub const CLIENT_REQUESTS: &str = "etcd_server_client_requests_total";
pub const RECEIVED_BYTES: &str = "etcd_network_client_grpc_received_bytes_total";
pub const SENT_BYTES: &str = "etcd_network_client_grpc_sent_bytes_total";
pub const HEALTH_SUCCESS: &str = "etcd_server_health_success";
pub const HEALTH_FAILURES: &str = "etcd_server_health_failures";

/// go-grpc-prometheus's default buckets of `grpc_server_handling_seconds`.
pub const HANDLING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The histograms this crate records and their buckets (etcd's), for the exporter.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[(HANDLING, HANDLING_BUCKETS)];

/// gRPC's code names, as grpc-go's `codes.Code.String()` writes them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `(service, method, grpc_type, registered at zero)`: every method served, with
/// go-grpc-prometheus's type. The registered ones are those etcd registers
/// go-grpc-prometheus with (its `etcdserverpb` services and health).
const METHODS: &[(&str, &str, &str, bool)] = &[
    ("etcdserverpb.KV", "Range", "unary", true),
    ("etcdserverpb.KV", "Put", "unary", true),
    ("etcdserverpb.KV", "DeleteRange", "unary", true),
    ("etcdserverpb.KV", "Txn", "unary", true),
    ("etcdserverpb.KV", "Compact", "unary", true),
    ("etcdserverpb.Watch", "Watch", "bidi_stream", true),
    ("etcdserverpb.Lease", "LeaseGrant", "unary", true),
    ("etcdserverpb.Lease", "LeaseRevoke", "unary", true),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream", true),
    ("etcdserverpb.Lease", "LeaseTimeToLive", "unary", true),
    ("etcdserverpb.Lease", "LeaseLeases", "unary", true),
    ("etcdserverpb.Cluster", "MemberAdd", "unary", true),
    ("etcdserverpb.Cluster", "MemberRemove", "unary", true),
    ("etcdserverpb.Cluster", "MemberUpdate", "unary", true),
    ("etcdserverpb.Cluster", "MemberList", "unary", true),
    ("etcdserverpb.Cluster", "MemberPromote", "unary", true),
    ("etcdserverpb.Maintenance", "Alarm", "unary", true),
    ("etcdserverpb.Maintenance", "Status", "unary", true),
    ("etcdserverpb.Maintenance", "Defragment", "unary", true),
    ("etcdserverpb.Maintenance", "Hash", "unary", true),
    ("etcdserverpb.Maintenance", "HashKV", "unary", true),
    (
        "etcdserverpb.Maintenance",
        "Snapshot",
        "server_stream",
        true,
    ),
    ("etcdserverpb.Maintenance", "MoveLeader", "unary", true),
    ("etcdserverpb.Auth", "AuthEnable", "unary", true),
    ("etcdserverpb.Auth", "AuthDisable", "unary", true),
    ("etcdserverpb.Auth", "AuthStatus", "unary", false),
    ("etcdserverpb.Auth", "Authenticate", "unary", true),
    ("etcdserverpb.Auth", "UserAdd", "unary", true),
    ("etcdserverpb.Auth", "UserGet", "unary", true),
    ("etcdserverpb.Auth", "UserList", "unary", true),
    ("etcdserverpb.Auth", "UserDelete", "unary", true),
    ("etcdserverpb.Auth", "UserChangePassword", "unary", true),
    ("etcdserverpb.Auth", "UserGrantRole", "unary", true),
    ("etcdserverpb.Auth", "UserRevokeRole", "unary", true),
    ("etcdserverpb.Auth", "RoleAdd", "unary", true),
    ("etcdserverpb.Auth", "RoleGet", "unary", true),
    ("etcdserverpb.Auth", "RoleList", "unary", true),
    ("etcdserverpb.Auth", "RoleDelete", "unary", true),
    ("etcdserverpb.Auth", "RoleGrantPermission", "unary", true),
    ("etcdserverpb.Auth", "RoleRevokePermission", "unary", true),
    ("grpc.health.v1.Health", "Check", "unary", true),
    ("grpc.health.v1.Health", "Watch", "server_stream", true),
    ("v3lockpb.Lock", "Lock", "unary", false),
    ("v3lockpb.Lock", "Unlock", "unary", false),
    ("v3electionpb.Election", "Campaign", "unary", false),
    ("v3electionpb.Election", "Proclaim", "unary", false),
    ("v3electionpb.Election", "Leader", "unary", false),
    ("v3electionpb.Election", "Observe", "server_stream", false),
    ("v3electionpb.Election", "Resign", "unary", false),
];

/// How much the request layers record (etcd's `--metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Telemetry {
    /// `--metrics extensive`: also the `grpc_server_handling_seconds` histogram.
    pub extensive: bool,
}

/// Gives this crate's metrics their help texts (etcd's); call after installing a
/// recorder.
pub fn describe() {
    describe_counter!(STARTED, "Total number of RPCs started on the server.");
    describe_counter!(
        HANDLED,
        "Total number of RPCs completed on the server, regardless of success or failure."
    );
    describe_counter!(
        MSG_RECEIVED,
        "Total number of RPC stream messages received on the server."
    );
    describe_counter!(
        MSG_SENT,
        "Total number of gRPC stream messages sent by the server."
    );
    describe_histogram!(
        HANDLING,
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server."
    );
    describe_counter!(
        CLIENT_REQUESTS,
        "The total number of client requests per client version."
    );
    describe_counter!(
        RECEIVED_BYTES,
        "The total number of bytes received from grpc clients."
    );
    describe_counter!(
        SENT_BYTES,
        "The total number of bytes sent to grpc clients."
    );
    describe_counter!(
        HEALTH_SUCCESS,
        "The total number of successful health checks"
    );
    describe_counter!(HEALTH_FAILURES, "The total number of failed health checks");
    counter!(HEALTH_SUCCESS).increment(0);
    counter!(HEALTH_FAILURES).increment(0);
}

/// One method's handles, made on first use (or when the layer is built, for the
/// registered methods).
struct Method {
    grpc_type: &'static str,
    stream: bool,
    handles: OnceLock<Handles>,
    service: &'static str,
    method: &'static str,
}

struct Handles {
    started: Counter,
    received: Counter,
    sent: Counter,
    handled: [Counter; 17],
    handling: Option<Histogram>,
}

impl Method {
    fn handles(&self, extensive: bool) -> &Handles {
        self.handles.get_or_init(|| {
            let (t, s, m) = (self.grpc_type, self.service, self.method);
            let labels = [("grpc_type", t), ("grpc_service", s), ("grpc_method", m)];
            Handles {
                started: counter!(STARTED, &labels),
                received: counter!(MSG_RECEIVED, &labels),
                sent: counter!(MSG_SENT, &labels),
                handled: CODES.map(|code| {
                    counter!(HANDLED, "grpc_type" => t, "grpc_service" => s, "grpc_method" => m, "grpc_code" => code)
                }),
                handling: extensive.then(|| metrics::histogram!(HANDLING, &labels)),
            }
        })
    }
}

struct Shared {
    by_path: HashMap<String, Method>,
    extensive: bool,
    received_bytes: Counter,
    sent_bytes: Counter,
}

/// The tower layer that records the gRPC request metrics (see the module docs).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    shared: Arc<Shared>,
}

impl GrpcMetricsLayer {
    pub fn new(t: Telemetry) -> Self {
        let by_path = METHODS
            .iter()
            .map(|&(service, method, grpc_type, _)| {
                (
                    format!("/{service}/{method}"),
                    Method {
                        grpc_type,
                        stream: grpc_type != "unary",
                        handles: OnceLock::new(),
                        service,
                        method,
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        for &(service, method, _, registered) in METHODS {
            if registered {
                let h = by_path[&format!("/{service}/{method}")].handles(t.extensive);
                // Registered at zero, as go-grpc-prometheus's preRegisterMethod does.
                h.started.increment(0);
                h.received.increment(0);
                h.sent.increment(0);
                h.handled.iter().for_each(|c| c.increment(0));
            }
        }
        let shared = Shared {
            by_path,
            extensive: t.extensive,
            received_bytes: counter!(RECEIVED_BYTES),
            sent_bytes: counter!(SENT_BYTES),
        };
        shared.received_bytes.increment(0);
        shared.sent_bytes.increment(0);
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<Request> for GrpcMetrics<S>
where
    S: tower::Service<Request, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let shared = self.shared.clone();
        let Some(m) = shared.by_path.get(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let start = Instant::now();
        let h = m.handles(shared.extensive);
        h.started.increment(1);
        let version = req
            .headers()
            .get("client-api-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_string();
        let kind = if m.stream { "stream" } else { "unary" };
        counter!(CLIENT_REQUESTS, "type" => kind, "client_api_version" => version).increment(1);
        let req = req.map(|b| {
            Body::new(Counted {
                inner: b,
                frames: FrameCounter::default(),
                msgs: h.received.clone(),
                bytes: shared.received_bytes.clone(),
                end: None,
            })
        });
        let mut done = Done {
            handled: h.handled.clone(),
            handling: h.handling.clone(),
            start,
            recorded: false,
        };
        let (sent, sent_bytes) = (h.sent.clone(), shared.sent_bytes.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A trailers-only answer (an error before any message) has its status in
            // the headers.
            if let Some(code) = resp.headers().get("grpc-status") {
                done.record(code.as_bytes());
            }
            Ok(resp.map(|b| {
                Body::new(Counted {
                    inner: b,
                    frames: FrameCounter::default(),
                    msgs: sent,
                    bytes: sent_bytes,
                    end: Some(done),
                })
            }))
        })
    }
}

/// Records a call's code (and time) once: from its status, or `Canceled` if the
/// response is dropped before its trailers.
struct Done {
    handled: [Counter; 17],
    handling: Option<Histogram>,
    start: Instant,
    recorded: bool,
}

impl Done {
    fn record(&mut self, status: &[u8]) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let code = std::str::from_utf8(status)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|c| *c < CODES.len())
            .unwrap_or(2);
        self.handled[code].increment(1);
        if let Some(h) = &self.handling {
            h.record(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        self.record(b"1");
    }
}

/// A body whose gRPC messages and bytes are counted as they pass.
struct Counted {
    inner: Body,
    frames: FrameCounter,
    msgs: Counter,
    bytes: Counter,
    /// On a response: where its status goes.
    end: Option<Done>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.increment(data.len() as u64);
                    let n = this.frames.feed(data);
                    if n > 0 {
                        this.msgs.increment(n);
                    }
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(end) = &mut this.end
                {
                    // No grpc-status in the trailers is a broken answer: Unknown.
                    end.record(t.get("grpc-status").map_or(b"2", |v| v.as_bytes()));
                }
            }
            Poll::Ready(None) => {
                if let Some(end) = &mut this.end {
                    end.record(b"2");
                }
            }
            _ => {}
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

/// Follows gRPC's framing (a flag byte, a 4-byte big-endian length, the message)
/// across chunks and counts the messages that complete.
#[derive(Debug, Default)]
struct FrameCounter {
    /// Header bytes seen of the current message (0..5).
    header: [u8; 5],
    have: usize,
    /// Message bytes still to come once the header is complete.
    remaining: u64,
}

impl FrameCounter {
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut done = 0;
        while !data.is_empty() {
            if self.have < 5 {
                let take = (5 - self.have).min(data.len());
                self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
                self.have += take;
                data = &data[take..];
                if self.have == 5 {
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.remaining = u64::from(len);
                } else {
                    break;
                }
            }
            let take = self.remaining.min(data.len() as u64);
            self.remaining -= take;
            data = &data[take as usize..];
            if self.remaining == 0 {
                done += 1;
                self.have = 0;
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counter_follows_messages_across_chunks() {
        let msg = |len: u32| {
            let mut v = vec![0];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend(std::iter::repeat_n(7, len as usize));
            v
        };
        let mut all = msg(3);
        all.extend(msg(0));
        all.extend(msg(300));
        let mut c = FrameCounter::default();
        assert_eq!(c.feed(&all), 3);
        // The same bytes one at a time.
        let mut c = FrameCounter::default();
        let n: u64 = all.iter().map(|b| c.feed(std::slice::from_ref(b))).sum();
        assert_eq!(n, 3);
        // A message cut in its header and in its body.
        let mut c = FrameCounter::default();
        assert_eq!(c.feed(&all[..2]), 0);
        assert_eq!(c.feed(&all[2..7]), 0);
        assert_eq!(c.feed(&all[7..]), 3);
    }

    #[test]
    fn every_served_method_has_a_type() {
        for &(s, m, t, _) in METHODS {
            assert!(
                ["unary", "bidi_stream", "server_stream", "client_stream"].contains(&t),
                "{s}/{m}"
            );
        }
        let registered = METHODS.iter().filter(|m| m.3).count();
        // etcd 3.4 registers 41 methods (its /metrics lists them at zero).
        assert_eq!(registered, 41);
    }
}
