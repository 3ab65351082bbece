//! The `etcdserverpb.Maintenance` and `etcdserverpb.Cluster` services.
//!
//! The RPCs a backend does not provide yet answer gRPC `Unimplemented` with a text that
//! names them; they never hang.
//!
//! `Snapshot` is framed here, as etcd's v3rpc layer frames it: the backend's image in
//! chunks (`remaining_bytes` counting down to 0), then one more message whose blob is
//! the SHA-256 of every byte sent before it. A client that saves the stream to a file
//! gets etcd's layout: image, then the 32-byte digest.

use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;

use concord_proto::etcdserverpb::{cluster_server::Cluster, maintenance_server::Maintenance, *};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{AuthBackend, caller_of};
use crate::backend::{ClusterBackend, MaintenanceBackend, SnapshotImage};
use crate::error::Error;

fn unavailable(rpc: &str) -> Status {
    Error::Unimplemented(format!(
        "concord: {rpc} is not supported by this server yet"
    ))
    .into()
}

/// Bytes per `SnapshotResponse` (etcd sends 32 KiB; fewer, larger messages cost less).
const SNAPSHOT_CHUNK: usize = 64 * 1024;
/// Chunks read ahead of a slow client; the reader waits when they are queued.
const SNAPSHOT_AHEAD: usize = 16;

/// Serves Maintenance over any [`MaintenanceBackend`].
pub struct MaintenanceService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
}

impl<B: ?Sized> MaintenanceService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>) -> Self {
        Self { backend, auth }
    }
}

/// Reads the image and sends it as etcd does, ending with the SHA-256 message. Stops
/// quietly when the client goes away.
fn stream_image(image: SnapshotImage, tx: mpsc::Sender<Result<SnapshotResponse, Status>>) {
    let SnapshotImage { size, mut data } = image;
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    loop {
        let mut blob = vec![0u8; SNAPSHOT_CHUNK];
        let mut n = 0;
        while n < blob.len() {
            match data.read(&mut blob[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::unknown(format!(
                        "etcdserver: reading the snapshot: {e}"
                    ))));
                    return;
                }
            }
        }
        if n == 0 {
            break;
        }
        blob.truncate(n);
        sent += n as u64;
        if sent > size {
            break;
        }
        sha.update(&blob);
        let msg = SnapshotResponse {
            header: None,
            remaining_bytes: size - sent,
            blob,
            version: String::new(),
        };
        if tx.blocking_send(Ok(msg)).is_err() {
            return;
        }
    }
    if sent != size {
        let _ = tx.blocking_send(Err(Status::unknown(format!(
            "etcdserver: snapshot image is {sent} bytes, {size} announced"
        ))));
        return;
    }
    let _ = tx.blocking_send(Ok(SnapshotResponse {
        header: None,
        remaining_bytes: 0,
        blob: sha.finalize().to_vec(),
        version: String::new(),
    }));
}

#[tonic::async_trait]
impl<B: MaintenanceBackend + ?Sized> Maintenance for MaintenanceService<B> {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.alarm(&caller, req.into_inner()).await?,
        ))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.backend.status().await?))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.defragment(&caller, req.into_inner()).await?,
        ))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.hash(&caller, req.into_inner()).await?,
        ))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.hash_kv(&caller, req.into_inner()).await?,
        ))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let image = self.backend.snapshot(&caller).await?;
        let (tx, rx) = mpsc::channel(SNAPSHOT_AHEAD);
        tokio::task::spawn_blocking(move || stream_image(image, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.move_leader(&caller, req.into_inner()).await?,
        ))
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unavailable("Maintenance.Downgrade"))
    }
}

/// Serves Cluster over any [`ClusterBackend`].
pub struct ClusterService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
}

impl<B: ?Sized> ClusterService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>) -> Self {
        Self { backend, auth }
    }
}

#[tonic::async_trait]
impl<B: ClusterBackend + ?Sized> Cluster for ClusterService<B> {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_peer_urls(&req.peer_ur_ls)?;
        Ok(Response::new(self.backend.member_add(&caller, req).await?))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend
                .member_remove(&caller, req.into_inner())
                .await?,
        ))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_peer_urls(&req.peer_ur_ls)?;
        Ok(Response::new(
            self.backend.member_update(&caller, req).await?,
        ))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.member_list(&caller, req.into_inner()).await?,
        ))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend
                .member_promote(&caller, req.into_inner())
                .await?,
        ))
    }
}

/// etcd refuses peer URLs that are not `scheme://host:port`.
fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(Error::MemberBadUrls.into());
    }
    for u in urls {
        let ok = u.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "http" | "https")
                && rest
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        });
        if !ok {
            return Err(Error::MemberBadUrls.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(size: u64, data: Vec<u8>) -> Vec<Result<SnapshotResponse, Status>> {
        let (tx, mut rx) = mpsc::channel(1024);
        stream_image(
            SnapshotImage {
                size,
                data: Box::new(std::io::Cursor::new(data)),
            },
            tx,
        );
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    #[test]
    fn snapshot_stream_counts_down_and_ends_with_the_sha256() {
        let image: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let msgs = collect(image.len() as u64, image.clone());
        let msgs: Vec<SnapshotResponse> = msgs.into_iter().map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), image.len().div_ceil(SNAPSHOT_CHUNK) + 1);
        let mut left = image.len() as u64;
        let mut got = Vec::new();
        for m in &msgs[..msgs.len() - 1] {
            left -= m.blob.len() as u64;
            assert_eq!(m.remaining_bytes, left);
            got.extend_from_slice(&m.blob);
        }
        assert_eq!(got, image);
        let last = msgs.last().unwrap();
        assert_eq!(last.remaining_bytes, 0);
        assert_eq!(last.blob, Sha256::digest(&image).to_vec());
    }

    #[test]
    fn a_short_image_ends_the_stream_with_an_error() {
        let msgs = collect(1000, vec![1; 10]);
        assert!(msgs[0].is_ok());
        assert!(msgs.last().unwrap().is_err());
    }
}
