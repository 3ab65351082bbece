//! The store's error type.

/// Errors of the revisioned store. Texts are those etcd's mvcc layer uses; the gateway
/// adds the `etcdserver: ` prefix when it maps them onto gRPC statuses.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// `ignore_value` / `ignore_lease` on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    #[error("requested lease not found")]
    LeaseNotFound,
    /// The storage engine failed; the message is the engine's.
    #[error("storage: {0}")]
    Storage(String),
    /// A record on disk that cannot be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A write failed earlier; the store refuses further writes rather than guess what
    /// reached the disk.
    #[error("store is poisoned by an earlier failed write: {0}")]
    Poisoned(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.into_string())
    }
}
