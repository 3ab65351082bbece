//! The server crate's error type: what can stop a member, or keep it from starting.
//! Client-visible refusals are not here: the apply path answers those with its own
//! deterministic errors, and the gateway's `Error` carries them to clients.

use concord_consensus as consensus;
use concord_mvcc as mvcc;

/// Why a member failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] mvcc::Error),
    #[error("consensus: {0}")]
    Consensus(#[from] consensus::Error),
    /// The server's own tables (leases, alarms, members) hold something undecodable.
    #[error("recorded {what}: {detail}")]
    Table { what: &'static str, detail: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A table entry that does not decode.
    pub fn table(what: &'static str) -> impl FnOnce(String) -> Error {
        move |detail| Error::Table { what, detail }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
