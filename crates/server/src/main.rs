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
    #[cfg(feature = "failpoints")]
    let _failpoints = concord_server::failpoints::setup();
    let args = Args::parse();
    let cfg = Config::load(&args)?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .context("--log-level")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("concord")
        .build()?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
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
    );
    let member = Member::open(&cfg, transport)
        .await
        .with_context(|| format!("opening {}", cfg.data_dir))?;
    let limits = Limits {
        max_request_bytes: cfg.max_request_bytes,
        max_txn_ops: cfg.max_txn_ops,
    };
    let router = member.router(limits);
    #[cfg(feature = "failpoints")]
    let router = router.merge(concord_server::failpoints::router());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for addr in cfg.client_listen_addrs()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for clients on {addr}"))?;
        tracing::info!(%addr, "serving client requests");
        let listener = concord_gateway::ClientListener::new(listener);
        let mut stop = stop_rx.clone();
        let router = router.clone();
        servers.push(tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    for addr in cfg.peer_listen_addrs()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {addr}"))?;
        tracing::info!(%addr, "serving peers");
        let mut stop = stop_rx.clone();
        let svc = concord_consensus::grpc::peer_service(member.inbox(), member.attributes());
        servers.push(tokio::spawn(async move {
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(concord_consensus::grpc::KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(concord_consensus::grpc::KEEPALIVE_TIMEOUT))
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await
                .map_err(std::io::Error::other)
        }));
    }
    eprintln!("concord ready: member {:x}", member.identity().member_id);
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
    if failed {
        anyhow::bail!("stopped after a fatal error (see the log above)");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
