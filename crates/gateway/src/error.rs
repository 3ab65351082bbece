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
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
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
            | InvalidSortOption | RequestTooLarge | MemberBadUrls | UserEmpty | RoleEmpty
            | AuthFailed | InvalidAuthMgmt | AuthOldRevision | PermissionNotGiven => {
                Code::InvalidArgument
            }
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
            | NotEnoughStartedMembers
            | RootUserNotExist
            | RootRoleNotExist
            | UserAlreadyExist
            | UserNotFound
            | RoleAlreadyExist
            | RoleNotFound
            | RoleNotGranted
            | PermissionNotGranted
            | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            NoLeader | LeaderChanged | Stopped | Timeout => Code::Unavailable,
            Corrupt => Code::DataLoss,
            Unimplemented(_) => Code::Unimplemented,
            Internal(_) | LeaderTransferTimeout => Code::Unknown,
        }
    }
}

/// gRPC metadata key of the error's code, for Concord members that forward a call to
/// another member: the receiver's [`Error`] comes back as itself ([`Error::from_status`])
/// without matching message texts. Clients see etcd's code and text as ever.
pub const ERROR_CODE_KEY: &str = "concord-error";

/// Every error that carries no text of its own, with its stable code name.
const CODED: &[(&str, Error)] = &[
    ("empty-key", Error::EmptyKey),
    ("key-not-found", Error::KeyNotFound),
    ("value-provided", Error::ValueProvided),
    ("lease-provided", Error::LeaseProvided),
    ("too-many-ops", Error::TooManyOps),
    ("duplicate-key", Error::DuplicateKey),
    ("invalid-sort-option", Error::InvalidSortOption),
    ("request-too-large", Error::RequestTooLarge),
    ("compacted", Error::Compacted),
    ("future-rev", Error::FutureRev),
    ("no-space", Error::NoSpace),
    ("lease-not-found", Error::LeaseNotFound),
    ("lease-exist", Error::LeaseExist),
    ("lease-ttl-too-large", Error::LeaseTtlTooLarge),
    ("member-not-found", Error::MemberNotFound),
    ("member-bad-urls", Error::MemberBadUrls),
    ("member-exist", Error::MemberExist),
    ("peer-url-exist", Error::PeerUrlExist),
    ("member-not-learner", Error::MemberNotLearner),
    ("learner-not-ready", Error::LearnerNotReady),
    ("too-many-learners", Error::TooManyLearners),
    ("not-enough-started-members", Error::NotEnoughStartedMembers),
    ("no-leader", Error::NoLeader),
    ("not-leader", Error::NotLeader),
    ("leader-changed", Error::LeaderChanged),
    ("stopped", Error::Stopped),
    ("timeout", Error::Timeout),
    ("corrupt", Error::Corrupt),
    ("bad-leader-transferee", Error::BadLeaderTransferee),
    ("leader-transfer-timeout", Error::LeaderTransferTimeout),
    ("root-user-not-exist", Error::RootUserNotExist),
    ("root-role-not-exist", Error::RootRoleNotExist),
    ("user-already-exist", Error::UserAlreadyExist),
    ("user-empty", Error::UserEmpty),
    ("user-not-found", Error::UserNotFound),
    ("role-already-exist", Error::RoleAlreadyExist),
    ("role-not-found", Error::RoleNotFound),
    ("role-empty", Error::RoleEmpty),
    ("auth-failed", Error::AuthFailed),
    ("permission-denied", Error::PermissionDenied),
    ("role-not-granted", Error::RoleNotGranted),
    ("permission-not-granted", Error::PermissionNotGranted),
    ("permission-not-given", Error::PermissionNotGiven),
    ("auth-not-enabled", Error::AuthNotEnabled),
    ("invalid-auth-token", Error::InvalidAuthToken),
    ("invalid-auth-mgmt", Error::InvalidAuthMgmt),
    ("auth-old-revision", Error::AuthOldRevision),
];

impl Error {
    /// The stable code name this error travels under between members (`None` for
    /// the errors that carry their own text).
    pub fn code_name(&self) -> Option<&'static str> {
        CODED.iter().find(|(_, e)| e == self).map(|(n, _)| *n)
    }

    /// The error a member answered with, from its status: by its code name when the
    /// status carries one, else an internal error with the status's text.
    pub fn from_status(s: &Status) -> Error {
        let coded = s
            .metadata()
            .get(ERROR_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|name| CODED.iter().find(|(n, _)| *n == name));
        match coded {
            Some((_, e)) => e.clone(),
            None if s.code() == Code::Unimplemented => Error::Unimplemented(s.message().into()),
            None => Error::Internal(s.message().into()),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let mut s = Status::new(e.code(), e.to_string());
        if let Some(name) = e.code_name() {
            s.metadata_mut().insert(
                ERROR_CODE_KEY,
                tonic::metadata::MetadataValue::from_static(name),
            );
        }
        s
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_travel_between_members_by_code() {
        for (name, e) in CODED {
            let s: Status = e.clone().into();
            assert_eq!(s.message(), e.to_string());
            assert_eq!(Error::from_status(&s), *e, "{name}");
        }
        let mut names: Vec<&str> = CODED.iter().map(|c| c.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CODED.len());
        // A status without a code (another server, an old member) is not guessed at.
        let plain = Status::new(Code::NotFound, "etcdserver: requested lease not found");
        assert_eq!(
            Error::from_status(&plain),
            Error::Internal("etcdserver: requested lease not found".into())
        );
        let s: Status = Error::Internal("boom".into()).into();
        assert_eq!(Error::from_status(&s), Error::Internal("boom".into()));
    }

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
