//! `concord`: one Concord member serving the etcd v3 API on its client URLs and Raft
//! on its peer URLs.

use anyhow::Context;
use clap::Parser;
use concord_gateway::Limits;
use concord_server::Member;
use concord_server::config::{Args, Config};
use tracing_subscriber::EnvFilter;

/// How long open connections may take to finish after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::load(&args)?;
    init_logs(&cfg)?;
    // After the logs: its panic hook wraps theirs.
    #[cfg(feature = "failpoints")]
    let _failpoints = concord_server::failpoints::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("concord")
        .build()?;
    runtime.block_on(serve(cfg))
}

/// The log subscriber: `--log-level` (or `RUST_LOG`) and `--log-format` (`json`: one
/// object per line, the event's fields at the top level beside `timestamp`, `level`,
/// `message` and `target`; a panic is such a line too, not Rust's text report).
fn init_logs(cfg: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .context("--log-level")?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.json_logs()? {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
        std::panic::set_hook(Box::new(log_panic));
    } else {
        logs.init();
    }
    Ok(())
}

/// A panic as an error event (`--log-format json`), with the backtrace when
/// `RUST_BACKTRACE` asks for one.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let panic = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    let location = info.location().map(|l| l.to_string()).unwrap_or_default();
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("<unnamed>");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(target: "panic", thread, location, panic, %backtrace, "thread panicked");
    } else {
        tracing::error!(target: "panic", thread, location, panic, "thread panicked");
    }
}

/// The client and peer TLS material of this member, from the flags.
struct Tls {
    client: Option<std::sync::Arc<concord_server::tls::ServerTls>>,
    peer_server: Option<std::sync::Arc<concord_server::tls::ServerTls>>,
    peer_client: Option<concord_consensus::grpc::PeerTls>,
}

fn opt_path(s: &str) -> Option<std::path::PathBuf> {
    (!s.is_empty()).then(|| std::path::PathBuf::from(s))
}

/// Builds the TLS configurations etcd's flags ask for, with etcd's errors for
/// combinations that cannot work.
fn load_tls(cfg: &Config) -> anyhow::Result<Tls> {
    use concord_server::config::{split_urls, url_host};
    use concord_server::tls::{ClientFiles, ClientTls, ServerFiles, ServerTls, TlsPolicy};
    let policy = TlsPolicy::new(
        &cfg.cipher_suites,
        &cfg.tls_min_version,
        &cfg.tls_max_version,
    )?;
    let fixtures = std::path::Path::new(&cfg.data_dir).join("fixtures");
    let hosts = |urls: &str| -> Vec<String> {
        let mut h: Vec<String> = split_urls(urls)
            .iter()
            .filter_map(|u| url_host(u))
            .collect();
        h.sort();
        h.dedup();
        h
    };
    // Client port.
    let client_https: Vec<String> = split_urls(&cfg.listen_client_urls)
        .into_iter()
        .filter(|u| concord_server::config::is_https(u))
        .collect();
    let (mut cert, mut key) = (cfg.cert_file.clone(), cfg.key_file.clone());
    if cfg.auto_tls && cert.is_empty() && key.is_empty() && !client_https.is_empty() {
        let (c, k) = concord_server::tls::self_signed(
            &fixtures.join("client"),
            &hosts(&cfg.listen_client_urls),
        )?;
        tracing::warn!(
            "serving clients with an automatically generated self-signed certificate (--auto-tls)"
        );
        (cert, key) = (c.display().to_string(), k.display().to_string());
    }
    let client = if client_https.is_empty() {
        if !cert.is_empty() {
            tracing::warn!(
                "scheme is HTTP while key and cert files are present; ignoring key and cert files"
            );
        }
        None
    } else {
        if cert.is_empty() || key.is_empty() {
            anyhow::bail!(
                "TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme",
                client_https[0]
            );
        }
        Some(ServerTls::open(
            ServerFiles {
                cert: cert.into(),
                key: key.into(),
                trusted_ca: opt_path(&cfg.trusted_ca_file),
                crl: opt_path(&cfg.client_crl_file),
                client_cert_auth: cfg.client_cert_auth,
                allowed_cn: None,
            },
            policy.clone(),
        )?)
    };
    // Peer port.
    let peer_https = split_urls(&cfg.listen_peer_urls)
        .iter()
        .chain(split_urls(&cfg.initial_advertise_peer_urls).iter())
        .any(|u| concord_server::config::is_https(u))
        || cfg.initial_cluster.contains("https://");
    let (mut pcert, mut pkey) = (cfg.peer_cert_file.clone(), cfg.peer_key_file.clone());
    let mut auto = false;
    if cfg.peer_auto_tls && pcert.is_empty() && pkey.is_empty() && peer_https {
        let (c, k) = concord_server::tls::self_signed(
            &fixtures.join("peer"),
            &hosts(&cfg.listen_peer_urls),
        )?;
        tracing::warn!(
            "peer TLS with an automatically generated self-signed certificate (--peer-auto-tls)"
        );
        (pcert, pkey) = (c.display().to_string(), k.display().to_string());
        auto = true;
    }
    let (peer_server, peer_client) = if !peer_https {
        (None, None)
    } else {
        if pcert.is_empty() || pkey.is_empty() {
            let addr = cfg
                .peer_listen_addrs()?
                .first()
                .map(|a| a.to_string())
                .unwrap_or_default();
            anyhow::bail!(
                "cannot listen on TLS for {addr}: KeyFile and CertFile are not presented"
            );
        }
        let server = ServerTls::open(
            ServerFiles {
                cert: pcert.clone().into(),
                key: pkey.clone().into(),
                trusted_ca: opt_path(&cfg.peer_trusted_ca_file),
                crl: opt_path(&cfg.peer_crl_file),
                client_cert_auth: cfg.peer_client_cert_auth,
                allowed_cn: (!cfg.peer_cert_allowed_cn.is_empty())
                    .then(|| cfg.peer_cert_allowed_cn.clone()),
            },
            policy.clone(),
        )?;
        let client = ClientTls::open(
            ClientFiles {
                cert: Some(pcert.into()),
                key: Some(pkey.into()),
                trusted_ca: opt_path(&cfg.peer_trusted_ca_file),
                skip_verify: auto && cfg.peer_trusted_ca_file.is_empty(),
            },
            policy,
        )?;
        let client: concord_consensus::grpc::PeerTls =
            std::sync::Arc::new(move || client.current());
        (Some(server), Some(client))
    };
    Ok(Tls {
        client,
        peer_server,
        peer_client,
    })
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let tls = load_tls(&cfg)?;
    // Before the member starts: its threads take their tracers from the provider.
    let tracing = match cfg.tracing()? {
        Some(opts) => {
            let t = concord_server::trace::install(&opts).context("distributed tracing")?;
            tracing::info!(
                address = %cfg.distributed_tracing_address,
                service_name = %opts.service_name,
                instance_id = opts.instance_id.as_deref().unwrap_or(""),
                sampling_rate = opts.samples_per_million,
                "distributed tracing enabled"
            );
            Some(t)
        }
        None => None,
    };
    let (ka_min_time, ka_interval, ka_timeout) = cfg.grpc_keepalive()?;
    // Outgoing peer connections bind to the host this member listens on for peers, so
    // a peer (or a test's fault proxy) can tell members apart by source address.
    let local_ip = cfg
        .peer_listen_addrs()?
        .first()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    let transport = concord_consensus::grpc::GrpcTransport::new(
        std::collections::HashMap::new(),
        local_ip,
        tokio::runtime::Handle::current(),
        tls.peer_client.clone(),
    );
    // Before the member opens, so its metrics are registered with the exporter.
    let exporter = Exporter::install()?;
    let member = Member::open(&cfg, transport)
        .await
        .with_context(|| format!("opening {}", cfg.data_dir))?;
    let limits = Limits {
        max_request_bytes: cfg.max_request_bytes,
        max_txn_ops: cfg.max_txn_ops,
    };
    let telemetry = concord_gateway::Telemetry {
        extensive: cfg.extensive_metrics()?,
    };
    let router = member.router(limits, telemetry);
    let router = router.merge(exporter.router());
    #[cfg(feature = "failpoints")]
    let router = router.merge(concord_server::failpoints::router());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let serve_opts = concord_gateway::ServeOptions {
        max_concurrent_streams: cfg.max_concurrent_streams,
        keepalive_interval: Some(ka_interval),
        keepalive_timeout: ka_timeout,
    };
    // etcd's metrics URLs serve /metrics and /health only, with the default ping policy.
    let metrics_router = exporter
        .router()
        .merge(concord_gateway::http::health_router(
            member.backends().health,
        ));
    let client_ping = concord_gateway::PingPolicy {
        min_time: ka_min_time,
    };
    let http_listeners = cfg
        .client_listen_urls()?
        .into_iter()
        .map(|(a, h)| (a, h, &router, client_ping, "clients"))
        .chain(
            cfg.metrics_listen_urls()?
                .into_iter()
                .map(|(a, h)| (a, h, &metrics_router, Default::default(), "metrics scrapes")),
        );
    for (addr, https, router, ping_policy, what) in http_listeners {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for {what} on {addr}"))?;
        tracing::info!(%addr, tls = https, "serving {what}");
        let handshaker = match (&tls.client, https) {
            (Some(t), true) => Some(concord_gateway::tls::Handshaker::new(t.clone())),
            _ => None,
        };
        let listener = concord_gateway::ClientListener::with_options(
            listener,
            concord_gateway::ListenerOptions {
                tls: handshaker,
                ping_policy,
            },
        );
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(concord_gateway::serve(
            listener,
            router.clone(),
            serve_opts,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }
    for (addr, https) in cfg.peer_listen_urls()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {addr}"))?;
        tracing::info!(%addr, tls = https, "serving peers");
        let mut stop = stop_rx.clone();
        let svc = concord_consensus::grpc::peer_service(member.inbox(), member.attributes());
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(concord_consensus::grpc::KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(concord_consensus::grpc::KEEPALIVE_TIMEOUT))
            .add_service(svc);
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match (&tls.peer_server, https) {
            (Some(t), true) => {
                let incoming = concord_server::tls::tls_incoming(
                    listener,
                    concord_gateway::tls::Handshaker::new(t.clone()),
                );
                servers.push(tokio::spawn(async move {
                    server
                        .serve_with_incoming_shutdown(incoming, stopped)
                        .await
                        .map_err(std::io::Error::other)
                }));
            }
            _ => servers.push(tokio::spawn(async move {
                server
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                        stopped,
                    )
                    .await
                    .map_err(std::io::Error::other)
            })),
        }
    }
    if cfg.json_logs()? {
        let member_id = format!("{:x}", member.identity().member_id);
        tracing::info!(%member_id, "concord ready");
    } else {
        eprintln!("concord ready: member {:x}", member.identity().member_id);
    }
    let failed = tokio::select! {
        _ = shutdown_signal() => false,
        _ = member.removed() => {
            // As etcd: a removed member stops serving and exits.
            tracing::warn!("this member was removed from the cluster; shutting down");
            false
        }
        _ = member.stopped() => true,
    };
    if failed {
        tracing::error!("the raft node stopped; shutting down");
    } else {
        tracing::info!("shutting down");
    }
    let _ = stop_tx.send(true);
    // In-flight requests get a moment to finish; a client that keeps its connection
    // open does not hold the process hostage.
    let drain = async {
        for s in servers {
            s.await??;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(SHUTDOWN_GRACE, drain).await {
        Ok(r) => r?,
        Err(_) => tracing::warn!("connections still open after the grace period; closing"),
    }
    drop(router);
    member.shutdown().await;
    if let Some(t) = tracing {
        // The spans still buffered, including this shutdown's.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    if failed {
        anyhow::bail!("stopped after a fatal error (see the log above)");
    }
    Ok(())
}

/// The Prometheus exporter: the process-wide recorder every crate's metrics go to,
/// with etcd's buckets, and the Go client's `process_*` metrics.
#[derive(Clone)]
struct Exporter {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
}

impl Exporter {
    fn install() -> anyhow::Result<Exporter> {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let mut b = PrometheusBuilder::new();
        for (name, buckets) in concord_server::metrics::histograms() {
            b = b.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
        }
        let handle = b
            .install_recorder()
            .context("installing the metrics recorder")?;
        concord_server::metrics::describe_all();
        let process = metrics_process::Collector::default();
        process.describe();
        process.collect();
        // Histograms' samples are folded in when scraped; this bounds their memory
        // between scrapes.
        let h = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every.tick().await;
                h.run_upkeep();
            }
        });
        Ok(Exporter {
            handle,
            process: std::sync::Arc::new(process),
        })
    }

    /// `GET /metrics` in Prometheus's text format.
    fn router(&self) -> axum::Router {
        let me = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let me = me.clone();
                async move {
                    me.process.collect();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        me.handle.render(),
                    )
                }
            }),
        )
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
