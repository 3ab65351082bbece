//! Forwarding to the leader: the calls only the leader can answer (lease keep-alives
//! and TTLs, learner promotion) go to its client port, marked as forwarded, and its
//! errors come back by their code ([`concord_gateway::ERROR_CODE_KEY`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_gateway::{Error as ApiError, Result as ApiResult};
use tonic::transport::Channel;

use crate::membership::Membership;

/// A cached channel to the current leader's client port.
pub struct LeaderLink {
    pub(crate) members: Arc<Membership>,
    pub(crate) cached: Mutex<Option<(u64, Channel)>>,
}

impl LeaderLink {
    pub(crate) fn new(members: Arc<Membership>) -> LeaderLink {
        LeaderLink {
            members,
            cached: Mutex::new(None),
        }
    }

    /// A channel to the client port of member `leader` (cached).
    pub(crate) fn channel(&self, leader: u64) -> ApiResult<Channel> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, c)) = cached.as_ref()
            && *id == leader
        {
            return Ok(c.clone());
        }
        let url = self
            .members
            .get(leader)
            .and_then(|m| m.client_ur_ls.first().cloned())
            // Its client URLs are not known yet: as good as no leader for this call.
            .ok_or(ApiError::NoLeader)?;
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| ApiError::Internal(format!("etcdserver: leader client URL: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        *cached = Some((leader, channel.clone()));
        Ok(channel)
    }
}

/// A status from the leader, back into the error a client of this member gets (by the
/// code it carries, see [`concord_gateway::ERROR_CODE_KEY`]).
pub(crate) fn status_error(s: tonic::Status) -> ApiError {
    ApiError::from_status(&s)
}

pub(crate) fn forwarded_request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        concord_gateway::FORWARDED_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    // The leader's request span continues this request's trace.
    if crate::trace::sampled() {
        crate::trace::inject(r.metadata_mut());
    }
    r
}
