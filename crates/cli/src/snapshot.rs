//! Snapshot files: download (`save`), inspect (`status`), and turn into a new member's
//! data directory (`restore`).
//!
//! A snapshot file is what etcd's `Snapshot` RPC streams: the store image (padded to
//! 512-byte blocks), then the SHA-256 of those bytes. etcdctl recognises the digest by
//! the file's length (32 more than a multiple of 512); so does this module.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb::SnapshotRequest;
use concord_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use sha2::{Digest, Sha256};

/// Bytes of the trailing digest.
pub const DIGEST_LEN: u64 = 32;

/// etcd's rule: a file carries the digest when its length is 32 past a multiple of 512.
pub fn has_checksum(len: u64) -> bool {
    len % 512 == DIGEST_LEN
}

/// What `snapshot status` reports, with etcdctl's meanings: a hash of the contents,
/// the store revision, the number of stored records (revisions of keys and every
/// record of the server's tables, leases, alarms, members...: etcd counts every bolt
/// key the same way), and the image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub hash: u32,
    pub revision: i64,
    pub total_keys: u64,
    pub total_size: u64,
}

/// An endpoint as etcdctl takes it (`host:port` or a URL) turned into a URL.
pub fn endpoint_url(e: &str) -> String {
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// Downloads a snapshot from `endpoint` into `path` (through `path.part`, fsynced and
/// renamed only once the digest checks out). Returns the file's size.
pub async fn save(endpoint: &str, path: &Path, timeout: Duration) -> Result<u64> {
    let part = PathBuf::from(format!("{}.part", path.display()));
    let r = tokio::time::timeout(timeout, download(endpoint, &part)).await;
    let size = match r {
        Ok(Ok(size)) => size,
        Ok(Err(e)) => {
            let _ = fs::remove_file(&part);
            return Err(e);
        }
        Err(_) => {
            let _ = fs::remove_file(&part);
            bail!("context deadline exceeded (snapshot download took over {timeout:?})");
        }
    };
    fs::rename(&part, path)
        .with_context(|| format!("could not rename {} to {}", part.display(), path.display()))?;
    Ok(size)
}

async fn download(endpoint: &str, part: &Path) -> Result<u64> {
    let url = endpoint_url(endpoint);
    let mut client = MaintenanceClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to {url}"))?
        .max_decoding_message_size(usize::MAX);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut file = File::create(part).with_context(|| format!("creating {}", part.display()))?;
    let mut sha = Sha256::new();
    // The last 32 bytes received are the digest, not image: hold them back.
    let mut tail: Vec<u8> = Vec::new();
    let mut size = 0u64;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        file.write_all(&msg.blob)?;
        size += msg.blob.len() as u64;
        tail.extend_from_slice(&msg.blob);
        if tail.len() > DIGEST_LEN as usize {
            let cut = tail.len() - DIGEST_LEN as usize;
            sha.update(&tail[..cut]);
            tail.drain(..cut);
        }
    }
    if !has_checksum(size) {
        bail!("sha256 checksum not found [bytes: {size}]");
    }
    if sha.finalize().as_slice() != tail.as_slice() {
        bail!("snapshot checksum mismatch: the download is damaged");
    }
    file.sync_all()?;
    Ok(size)
}

/// The file's image length, after checking its digest (unless `skip_hash_check`).
/// A file without a digest needs `skip_hash_check`, as in etcd.
fn checked_image_len(file: &mut File, skip_hash_check: bool) -> Result<u64> {
    let len = file.metadata()?.len();
    if !has_checksum(len) {
        ensure!(
            skip_hash_check,
            "snapshot missing hash but --skip-hash-check=false"
        );
        return Ok(len);
    }
    let body = len - DIGEST_LEN;
    if !skip_hash_check {
        file.seek(SeekFrom::Start(0))?;
        let mut sha = Sha256::new();
        io::copy(&mut BufReader::new(&mut *file).take(body), &mut sha)?;
        let mut want = [0u8; DIGEST_LEN as usize];
        file.seek(SeekFrom::Start(body))?;
        file.read_exact(&mut want)?;
        ensure!(
            sha.finalize().as_slice() == want,
            "expected sha256 {}, got a different digest: the snapshot file is damaged",
            hex(&want)
        );
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(body)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `snapshot status`: reads and checks the whole file.
pub fn status(path: &Path) -> Result<Status> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let body = checked_image_len(&mut file, false).or_else(|e| {
        // etcdctl's status does not insist on the digest; a file without one is read
        // as it is, but a wrong digest is reported.
        if has_checksum(file.metadata()?.len()) {
            Err(e)
        } else {
            file.seek(SeekFrom::Start(0))?;
            Ok(file.metadata()?.len())
        }
    })?;
    let info = mvcc::inspect_image(&mut (&mut file).take(body))
        .with_context(|| format!("{} is not a concord snapshot", path.display()))?;
    Ok(Status {
        hash: info.hash,
        revision: info.revision,
        total_keys: info.records + info.aux,
        total_size: body,
    })
}

/// `snapshot restore` settings, with etcdctl's names and defaults.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub snapshot: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: String,
    pub skip_hash_check: bool,
}

/// What a restore produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub revision: i64,
    pub records: u64,
    /// Records of the server's own tables (leases, alarms, members, ...).
    pub aux: u64,
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// Checks the cluster flags as etcd does before it writes anything: `name` is in
/// `--initial-cluster` with exactly the URLs of `--initial-advertise-peer-urls`.
fn check_cluster_flags(o: &RestoreOptions) -> Result<()> {
    let mut mine = Vec::new();
    for item in split_list(&o.initial_cluster) {
        let (n, u) = item
            .split_once('=')
            .with_context(|| format!("--initial-cluster entry {item:?} is not name=url"))?;
        if n.trim() == o.name {
            mine.push(u.trim().to_string());
        }
    }
    ensure!(
        !mine.is_empty(),
        "couldn't find local name {:?} in the initial cluster configuration",
        o.name
    );
    let mut advertised = split_list(&o.initial_advertise_peer_urls);
    mine.sort();
    advertised.sort();
    ensure!(
        mine == advertised,
        "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
        o.name,
        mine.join(","),
        advertised.join(",")
    );
    ensure!(
        !o.initial_cluster_token.is_empty(),
        "--initial-cluster-token must not be empty"
    );
    Ok(())
}

/// `snapshot restore`: a new member's data directory (`DIR/mvcc` holding the image,
/// applied index 0) that `concord` started with the same cluster flags turns into the
/// first member of a new cluster. Refuses a data directory that exists and is not
/// empty; removes what it created if it fails.
pub fn restore(o: &RestoreOptions) -> Result<Restored> {
    check_cluster_flags(o)?;
    let dir = &o.data_dir;
    let existed = dir.exists();
    if existed
        && fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "data-dir {:?} not empty or could not be read",
            dir.display()
        );
    }
    let mut file =
        File::open(&o.snapshot).with_context(|| format!("opening {}", o.snapshot.display()))?;
    let body = checked_image_len(&mut file, o.skip_hash_check)?;
    let info = mvcc::inspect_image(&mut BufReader::new(&mut file).take(body))
        .with_context(|| format!("{} is not a concord snapshot", o.snapshot.display()))?;
    file.seek(SeekFrom::Start(0))?;
    let r = (|| -> Result<()> {
        fs::create_dir_all(dir)?;
        let store = mvcc::Store::open(dir.join("mvcc"), mvcc::StoreOptions::default())?;
        // Applied index 0: the new member's Raft log starts empty, and every entry in
        // it is still to be applied on top of the image.
        store.import(&mut BufReader::new(&mut file).take(body), 0)?;
        Ok(())
    })();
    if let Err(e) = r {
        if existed {
            let _ = fs::remove_dir_all(dir.join("mvcc"));
        } else {
            let _ = fs::remove_dir_all(dir);
        }
        return Err(e.context(format!("restoring into {}", dir.display())));
    }
    Ok(Restored {
        revision: info.revision,
        records: info.records,
        aux: info.aux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A snapshot file as the `Snapshot` RPC would make it.
    fn snapshot_file(dir: &Path) -> (PathBuf, Vec<u8>) {
        let store =
            Arc::new(mvcc::Store::open(dir.join("src"), mvcc::StoreOptions::default()).unwrap());
        for i in 0..10 {
            let mut w = store.writer().unwrap();
            w.put(
                &mvcc::PutRequest {
                    key: format!("k{}", i % 3).into_bytes(),
                    value: format!("v{i}").into_bytes(),
                    ..Default::default()
                },
                &mvcc::NoLeases,
            )
            .unwrap();
            w.commit(Some(100 + i)).unwrap();
        }
        let mut image = Vec::new();
        store.export().unwrap().read_to_end(&mut image).unwrap();
        image.resize(image.len().div_ceil(512) * 512, 0);
        let digest = Sha256::digest(&image);
        let mut file = image.clone();
        file.extend_from_slice(&digest);
        let path = dir.join("s.db");
        fs::write(&path, &file).unwrap();
        (path, image)
    }

    fn opts(snapshot: &Path, data_dir: &Path) -> RestoreOptions {
        RestoreOptions {
            snapshot: snapshot.into(),
            data_dir: data_dir.into(),
            name: "m1".into(),
            initial_cluster: "m1=http://127.0.0.1:1,m2=http://127.0.0.1:2".into(),
            initial_cluster_token: "t".into(),
            initial_advertise_peer_urls: "http://127.0.0.1:1".into(),
            skip_hash_check: false,
        }
    }

    #[test]
    fn status_reads_the_image_and_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (path, image) = snapshot_file(dir.path());
        let s = status(&path).unwrap();
        assert_eq!((s.revision, s.total_keys), (11, 10));
        assert_eq!(s.total_size, image.len() as u64);
        let mut bytes = fs::read(&path).unwrap();
        bytes[40] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(status(&path).is_err());
    }

    #[test]
    fn restore_builds_a_store_without_identity_or_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = snapshot_file(dir.path());
        let out = dir.path().join("new");
        let r = restore(&opts(&path, &out)).unwrap();
        assert_eq!((r.revision, r.records), (11, 10));
        let store = mvcc::Store::open(out.join("mvcc"), mvcc::StoreOptions::default()).unwrap();
        assert_eq!(store.current_revision(), 11);
        assert_eq!(store.consistent_index().unwrap(), 0);
        assert_eq!(store.meta("member_id").unwrap(), None);
        drop(store);
        // Never over an existing member.
        assert!(restore(&opts(&path, &out)).is_err());
    }

    #[test]
    fn restore_refuses_bad_flags_and_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = snapshot_file(dir.path());
        let out = dir.path().join("new");
        let mut o = opts(&path, &out);
        o.name = "m3".into();
        assert!(restore(&o).is_err());
        let mut o = opts(&path, &out);
        o.initial_advertise_peer_urls = "http://127.0.0.1:9".into();
        assert!(restore(&o).is_err());
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let e = restore(&opts(&path, &out)).unwrap_err();
        assert!(format!("{e:#}").contains("sha256"), "{e:#}");
        assert!(!out.exists(), "nothing is left behind");
    }

    #[test]
    fn a_file_without_digest_needs_skip_hash_check() {
        let dir = tempfile::tempdir().unwrap();
        let (_, image) = snapshot_file(dir.path());
        let bare = dir.path().join("bare.img");
        fs::write(&bare, &image).unwrap();
        let out = dir.path().join("new");
        let e = restore(&opts(&bare, &out)).unwrap_err();
        assert!(format!("{e}").contains("--skip-hash-check"), "{e}");
        let mut o = opts(&bare, &out);
        o.skip_hash_check = true;
        assert_eq!(restore(&o).unwrap().revision, 11);
    }
}
