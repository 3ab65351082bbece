//! etcd's client-visible errors, and their one mapping onto gRPC statuses.
//!
//! Codes and texts are etcd's (`api/v3rpc/rpctypes`): Go clients recognise errors by
//! the exact text, so these strings are part of the wire protocol.

use tonic::{Code, Status};

/// An error a backend or the gateway's own checks return to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: member ID already exist")]
    MemberExist,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// `MoveLeader` to a member that does not exist or is a learner.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// `MoveLeader` did not see the target lead in time. etcd has no gRPC mapping for
    /// it, so clients get code `Unknown` with this text.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// An RPC this server does not offer (yet); the text names it.
    #[error("{0}")]
    Unimplemented(String),
    /// A failure inside the server that is none of the above; the text says what.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code etcd uses for this error.
    pub fn code(&self) -> Code {
        use Error::*;
        match self {
            EmptyKey | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | InvalidSortOption | RequestTooLarge | MemberBadUrls => Code::InvalidArgument,
            Compacted | FutureRev | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace => Code::ResourceExhausted,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            LeaseExist
            | NotLeader
            | BadLeaderTransferee
            | MemberExist
            | PeerUrlExist
            | MemberNotLearner
            | LearnerNotReady
            | TooManyLearners
            | NotEnoughStartedMembers => Code::FailedPrecondition,
            NoLeader | LeaderChanged | Stopped | Timeout => Code::Unavailable,
            Corrupt => Code::DataLoss,
            Unimplemented(_) => Code::Unimplemented,
            Internal(_) | LeaderTransferTimeout => Code::Unknown,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_texts_are_etcds() {
        let s: Status = Error::Compacted.into();
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s: Status = Error::LeaseNotFound.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "etcdserver: requested lease not found")
        );
        let s: Status = Error::RequestTooLarge.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "etcdserver: request is too large")
        );
        let s: Status = Error::NoSpace.into();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded"
            )
        );
        let s: Status = Error::BadLeaderTransferee.into();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::FailedPrecondition,
                "etcdserver: bad leader transferee"
            )
        );
        let s: Status = Error::NoLeader.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "etcdserver: no leader")
        );
    }
}
