//! Distributed tracing and structured logs of real `concord` processes.
//!
//! An OTLP/gRPC receiver (opentelemetry-proto's `TraceService` on a tonic server)
//! collects what the members export. A Put with a W3C `traceparent` sent to a follower
//! of a 3-member cluster comes back as one trace: the follower's request, `propose`
//! and `raft.forward` spans, the leader's `raft.proposal`, `raft.commit` and
//! `raft.apply`, the follower's own `raft.apply` and the `reply`, linked parent to
//! child across the members (told apart by `service.instance.id`). With tracing off
//! nothing reaches the receiver, not even a connection. `--log-format json` lines
//! parse as JSON, carry the events' fields and never a key or value.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{retry_transient, wait_until};
use concord_proto::etcdserverpb::PutRequest;
use concord_proto::etcdserverpb::kv_client::KvClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tokio_stream::StreamExt as _;

const DEADLINE: Duration = Duration::from_secs(30);
const KEY: &str = "traced-key-7f3a";
const VALUE: &str = "traced-value-c91e";

/// One exported span with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    kind: i32,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

#[derive(Default)]
struct Collected {
    spans: Mutex<Vec<Got>>,
    exports: AtomicUsize,
    connections: AtomicUsize,
}

fn strings(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

struct Receiver(Arc<Collected>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.exports.fetch_add(1, Ordering::SeqCst);
        let mut out = self.0.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        name: s.name,
                        kind: s.kind,
                        attributes: strings(&s.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP receiver on 127.0.0.1 (port chosen by the OS); counts connections too.
async fn receiver() -> (Arc<Collected>, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collected = Arc::new(Collected::default());
    let counting = collected.clone();
    let incoming = counted(listener, counting);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(collected.clone())))
            .serve_with_incoming(incoming),
    );
    (collected, addr)
}

/// The listener's connections as a stream, counted as they are accepted.
fn counted(
    listener: tokio::net::TcpListener,
    c: Arc<Collected>,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        c.connections.fetch_add(1, Ordering::SeqCst);
        s
    })
}

fn tracing_flags(addr: std::net::SocketAddr) -> Vec<String> {
    vec![
        "--experimental-enable-distributed-tracing".into(),
        format!("--experimental-distributed-tracing-address={addr}"),
        "--experimental-distributed-tracing-sampling-rate=1000000".into(),
    ]
}

/// A fresh W3C trace id and parent span id, as hex.
fn ids(n: u64) -> (String, String) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (
        format!("{:016x}{:016x}", t, n.wrapping_add(0x9e37_79b9_7f4a_7c15)),
        format!("{:016x}", (t ^ 0x5555) | 1),
    )
}

/// Puts `KEY` on `endpoint` with a sampled `traceparent`, retrying transient errors,
/// each attempt in a trace of its own. Returns the successful attempt's trace id and
/// client span id.
async fn traced_put(endpoint: &str) -> (String, String) {
    let attempt = AtomicUsize::new(0);
    retry_transient(DEADLINE, "a traced put", || {
        let n = attempt.fetch_add(1, Ordering::SeqCst) as u64;
        let endpoint = endpoint.to_string();
        async move {
            let (trace, span) = ids(n);
            let mut kv = KvClient::connect(endpoint).await?;
            let mut req = tonic::Request::new(PutRequest {
                key: KEY.into(),
                value: VALUE.into(),
                ..Default::default()
            });
            req.metadata_mut()
                .insert("traceparent", format!("00-{trace}-{span}-01").parse()?);
            kv.put(req).await?;
            Ok((trace, span))
        }
    })
    .await
    .expect("the traced put")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The trace's spans, once `complete` accepts them (or the deadline passes).
async fn wait_for_trace(
    c: &Collected,
    trace: &str,
    mut complete: impl FnMut(&[Got]) -> Result<()>,
) -> Vec<Got> {
    let found = Mutex::new(Vec::new());
    let r = wait_until(DEADLINE, "the put's spans", || {
        let spans: Vec<Got> = c
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace)
            .cloned()
            .collect();
        let r = complete(&spans);
        *found.lock().unwrap() = spans;
        async move { r }
    })
    .await;
    let spans = found.into_inner().unwrap();
    if let Err(e) = r {
        panic!("{e:#}\nspans of the trace: {spans:#?}");
    }
    spans
}

/// The one span named `name` of member `instance` (by `service.instance.id`).
fn one<'a>(spans: &'a [Got], name: &str, instance: &str) -> Result<&'a Got> {
    let mut it = spans.iter().filter(|s| {
        s.name == name
            && s.resource.get("service.instance.id").map(String::as_str) == Some(instance)
    });
    let s = it
        .next()
        .with_context(|| format!("no {name} span from {instance}"))?;
    ensure!(
        it.next().is_none(),
        "more than one {name} span from {instance}"
    );
    Ok(s)
}

fn child_of(child: &Got, parent: &Got) -> Result<()> {
    let member = |s: &Got| s.resource.get("service.instance.id").cloned();
    ensure!(
        child.parent == parent.span_id,
        "{} ({:?}) is not a child of {} ({:?})",
        child.name,
        member(child),
        parent.name,
        member(parent),
    );
    Ok(())
}

/// Sends SIGTERM to member `i` and waits until it has exited (a clean shutdown
/// exports the spans still buffered).
async fn stop(cluster: &mut Cluster, i: usize) {
    let pid = cluster.members[i].pid().expect("running");
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(ok.success());
    let end = Instant::now() + DEADLINE;
    while !cluster.exited(i) {
        assert!(
            Instant::now() < end,
            "n{} did not exit after SIGTERM",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_to_a_follower_is_one_trace_across_members() {
    let (collected, addr) = receiver().await;
    let mut opts = ClusterOptions::fast();
    opts.extra.extend(tracing_flags(addr));
    let instance = |i: usize| {
        vec![format!(
            "--experimental-distributed-tracing-instance-id=n{}",
            i + 1
        )]
    };
    let cluster = Cluster::start_each(Kind::Concord, opts, instance)
        .await
        .unwrap();
    let leader = cluster.leader().await.unwrap();
    let follower = (leader + 1) % 3;
    let (l, f) = (format!("n{}", leader + 1), format!("n{}", follower + 1));
    let started = Instant::now();
    let (trace, client_span) = traced_put(&cluster.endpoint(follower)).await;

    let check = |spans: &[Got]| -> Result<()> {
        let request = one(spans, "etcdserverpb.KV/Put", &f)?;
        ensure!(hex(&request.parent) == client_span, "request span's parent");
        ensure!(request.kind == 2, "the request span is a server span");
        ensure!(
            request
                .attributes
                .get("rpc.grpc.status_code")
                .map(String::as_str)
                == Some("0")
        );
        let propose = one(spans, "propose", &f)?;
        child_of(propose, request)?;
        ensure!(propose.attributes.get("command").map(String::as_str) == Some("put"));
        let forward = one(spans, "raft.forward", &f)?;
        child_of(forward, propose)?;
        let proposal = one(spans, "raft.proposal", &l)?;
        child_of(proposal, forward)?;
        let commit = one(spans, "raft.commit", &l)?;
        child_of(commit, proposal)?;
        child_of(one(spans, "raft.apply", &l)?, proposal)?;
        child_of(one(spans, "raft.apply", &f)?, proposal)?;
        child_of(one(spans, "reply", &f)?, request)?;
        Ok(())
    };
    let spans = wait_for_trace(&collected, &trace, check).await;
    eprintln!(
        "{} spans of the put arrived {:?} after it was sent",
        spans.len(),
        started.elapsed()
    );
    for s in &spans {
        assert_eq!(s.resource["service.name"], "etcd", "etcd's default name");
        let all = format!("{:?} {:?} {}", s.attributes, s.resource, s.name);
        assert!(
            !all.contains(KEY) && !all.contains(VALUE),
            "a span carries the key or value: {s:?}"
        );
    }
    let members: std::collections::HashSet<_> = spans
        .iter()
        .map(|s| s.resource["service.instance.id"].clone())
        .collect();
    assert!(members.len() >= 2, "spans from {members:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tracing_off_nothing_is_exported() {
    // Tracing on: the control. A clean stop exports what is buffered, so the spans are
    // there once the process has exited.
    let (on, addr) = receiver().await;
    let mut opts = ClusterOptions {
        size: 1,
        ..ClusterOptions::default()
    };
    opts.extra.extend(tracing_flags(addr));
    let mut cluster = Cluster::start(Kind::Concord, opts).await.unwrap();
    let (trace, _) = traced_put(&cluster.endpoint(0)).await;
    stop(&mut cluster, 0).await;
    let traced = on
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| hex(&s.trace_id) == trace)
        .count();
    assert!(traced >= 5, "{traced} spans of the put with tracing on");

    // Off (the default), with the address set and a sampled client trace: no span and
    // not even a connection reach the receiver, before or after a clean stop.
    let (off, addr) = receiver().await;
    let opts = ClusterOptions {
        size: 1,
        extra: vec![
            format!("--experimental-distributed-tracing-address={addr}"),
            "--experimental-distributed-tracing-sampling-rate=1000000".into(),
        ],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(Kind::Concord, opts).await.unwrap();
    traced_put(&cluster.endpoint(0)).await;
    stop(&mut cluster, 0).await;
    assert_eq!(off.connections.load(Ordering::SeqCst), 0);
    assert_eq!(off.exports.load(Ordering::SeqCst), 0);
    assert!(off.spans.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_parse_and_carry_fields_but_no_user_data() {
    // Debug level and three members: raft-rs's dumps of the messages that carry the
    // entry (the forwarded proposal, the appends) are on, and must not print it.
    let mut opts = ClusterOptions::fast();
    opts.extra
        .extend(["--log-format=json".into(), "--log-level=debug".into()]);
    let mut cluster = Cluster::start(Kind::Concord, opts).await.unwrap();
    let leader = cluster.leader().await.unwrap();
    traced_put(&cluster.endpoint((leader + 1) % 3)).await;
    for i in 0..3 {
        stop(&mut cluster, i).await;
    }
    let mut lines = 0;
    let mut with_fields = 0;
    for i in 0..3 {
        let log = cluster.member_log(i);
        assert!(log.contains("\"message\":\"concord ready\""), "{log}");
        for line in log.lines() {
            if line.starts_with("===== ") || line.trim().is_empty() {
                continue; // the harness's header of each log file
            }
            lines += 1;
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(v.get(field).is_some(), "no {field}: {line}");
            }
            if v.get("member_id").is_some() && v.get("term").is_some() {
                with_fields += 1;
            }
            assert!(
                !line.contains(KEY) && !line.contains(VALUE),
                "a log line carries the key or value: {line}"
            );
        }
    }
    assert!(lines > 30, "{lines} lines");
    assert!(with_fields > 0, "no line with member_id and term");
}
