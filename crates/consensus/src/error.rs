//! The consensus layer's error type.

/// Why a proposal, a read or the node itself failed. The first four are what a client
/// sees (the server maps them onto etcd's errors); the rest are failures of the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No leader is known: an election is under way or this member is cut off.
    #[error("no leader")]
    NoLeader,
    /// The leader changed while a read was waiting for its read index.
    #[error("leader changed")]
    LeaderChanged,
    /// The request was not committed (or the read not confirmed) in time; a proposal
    /// may still be applied later.
    #[error("request timed out")]
    Timeout,
    /// A membership change was proposed while another is not yet applied.
    #[error("a membership change is already in progress")]
    ChangeInProgress,
    /// The node has stopped (shut down, or a fatal storage error).
    #[error("node stopped")]
    Stopped,
    #[error("storage: {0}")]
    Storage(#[from] concord_storage::Error),
    /// raft-rs refused or failed an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A stored or received Raft record does not decode.
    #[error("{what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: protobuf::ProtobufError,
    },
    /// A peer sent what no correct peer sends (it was not handed to Raft).
    #[error("refused: {0}")]
    Refused(String),
    /// The log, a snapshot and the state machine disagree in a way Raft cannot go on
    /// from (a bug or a damaged data directory).
    #[error("{0}")]
    Inconsistent(String),
    /// The state machine failed (fatal: the node stops).
    #[error("state machine: {0}")]
    StateMachine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A peer could not be asked (unreachable, not a member, or it refused).
    #[error("peer {url}: {reason}")]
    Peer { url: String, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A decoding failure of `what`.
    pub(crate) fn decode(what: impl Into<String>) -> impl FnOnce(protobuf::ProtobufError) -> Error {
        let what = what.into();
        move |source| Error::Decode { what, source }
    }

    /// A state machine's failure.
    pub(crate) fn state_machine(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::StateMachine(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
