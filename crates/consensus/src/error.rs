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
    #[error("raft: {0}")]
    Raft(String),
    #[error("state machine: {0}")]
    StateMachine(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<raft::Error> for Error {
    fn from(e: raft::Error) -> Self {
        Error::Raft(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
