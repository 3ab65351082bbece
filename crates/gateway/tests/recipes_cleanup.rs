//! Lock, Campaign and Observe leave nothing behind when their caller goes away: the
//! watch they wait on is closed, and a waiter's key is taken out of line. Driven over a
//! fake backend in which an older key holds the lock/leadership for ever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_gateway::{
    AuthBackend, Caller, Credentials, ElectionService, Error, KvBackend, LeaseBackend, Limits,
    LockService, Result, WatchBackend, WatchSession, async_trait,
};
use concord_proto::etcdserverpb::*;
use concord_proto::mvccpb::KeyValue;
use concord_proto::v3electionpb::{CampaignRequest, LeaderRequest, election_server::Election};
use concord_proto::v3lockpb::{LockRequest, lock_server::Lock};
use tonic::Request;

/// The revision every write and read of the fake answers with.
const REV: i64 = 10;
/// The id of every lease the fake grants.
const GRANTED: i64 = 0x2b;

#[derive(Default)]
struct Fake {
    /// An older key under every prefix, or none (an empty election).
    holder: Option<KeyValue>,
    txns: Mutex<Vec<TxnRequest>>,
    grants: Mutex<Vec<LeaseGrantRequest>>,
    open_watches: Arc<AtomicUsize>,
    watches_opened: AtomicUsize,
    /// Who each call of the recipes was made as.
    callers: Mutex<Vec<Caller>>,
}

/// The token the tests' calls carry, and the caller it names.
const TOKEN: &str = "alice-token";

fn alice() -> Caller {
    Caller {
        user: Some("alice".into()),
        revision: 3,
        token: Some(TOKEN.into()),
    }
}

fn as_alice<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("token", TOKEN.parse().unwrap());
    r
}

fn header() -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision: REV,
        ..ResponseHeader::default()
    })
}

impl Fake {
    fn holding() -> Fake {
        Fake {
            holder: Some(KeyValue {
                key: b"holder".to_vec(),
                create_revision: 5,
                mod_revision: 5,
                version: 1,
                ..KeyValue::default()
            }),
            ..Fake::default()
        }
    }

    fn older(&self, r: &RangeRequest) -> Vec<KeyValue> {
        if r.range_end.is_empty() {
            // A single key: the caller's own, which the fake does not keep.
            return Vec::new();
        }
        self.holder.iter().cloned().collect()
    }

    fn called_by(&self, c: &Caller) {
        self.callers.lock().unwrap().push(c.clone());
    }

    /// Every call was made as alice.
    fn only_alice_called(&self) {
        let callers = self.callers.lock().unwrap();
        assert!(!callers.is_empty());
        assert!(callers.iter().all(|c| *c == alice()), "{callers:?}");
    }

    fn deletes(&self) -> Vec<TxnRequest> {
        self.txns
            .lock()
            .unwrap()
            .iter()
            .filter(|t| {
                t.success.iter().any(|op| {
                    matches!(op.request, Some(request_op::Request::RequestDeleteRange(_)))
                })
            })
            .cloned()
            .collect()
    }
}

#[async_trait]
impl KvBackend for Fake {
    async fn range(&self, c: &Caller, r: RangeRequest) -> Result<RangeResponse> {
        self.called_by(c);
        let kvs = self.older(&r);
        Ok(RangeResponse {
            header: header(),
            count: kvs.len() as i64,
            kvs,
            ..RangeResponse::default()
        })
    }

    async fn put(&self, c: &Caller, _: PutRequest) -> Result<PutResponse> {
        self.called_by(c);
        Err(Error::Unimplemented("put".into()))
    }

    async fn delete_range(&self, c: &Caller, _: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        self.called_by(c);
        Err(Error::Unimplemented("delete".into()))
    }

    async fn txn(&self, c: &Caller, t: TxnRequest) -> Result<TxnResponse> {
        self.called_by(c);
        self.txns.lock().unwrap().push(t.clone());
        // Every compare holds: the caller's key is new, or still its own.
        let responses = t
            .success
            .iter()
            .map(|op| ResponseOp {
                response: Some(match &op.request {
                    Some(request_op::Request::RequestRange(r)) => {
                        response_op::Response::ResponseRange(RangeResponse {
                            header: header(),
                            kvs: self.older(r),
                            ..RangeResponse::default()
                        })
                    }
                    Some(request_op::Request::RequestDeleteRange(_)) => {
                        response_op::Response::ResponseDeleteRange(DeleteRangeResponse {
                            header: header(),
                            deleted: 1,
                            ..DeleteRangeResponse::default()
                        })
                    }
                    _ => response_op::Response::ResponsePut(PutResponse {
                        header: header(),
                        ..PutResponse::default()
                    }),
                }),
            })
            .collect();
        Ok(TxnResponse {
            header: header(),
            succeeded: true,
            responses,
        })
    }

    async fn compact(&self, c: &Caller, _: CompactionRequest) -> Result<CompactionResponse> {
        self.called_by(c);
        Err(Error::Unimplemented("compact".into()))
    }
}

#[async_trait]
impl LeaseBackend for Fake {
    async fn lease_grant(&self, c: &Caller, req: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        self.called_by(c);
        self.grants.lock().unwrap().push(req);
        Ok(LeaseGrantResponse {
            header: header(),
            id: GRANTED,
            ttl: req.ttl,
            error: String::new(),
        })
    }

    async fn lease_revoke(&self, c: &Caller, _: LeaseRevokeRequest) -> Result<LeaseRevokeResponse> {
        self.called_by(c);
        Err(Error::Unimplemented("revoke".into()))
    }

    async fn lease_keep_alive(
        &self,
        _: LeaseKeepAliveRequest,
        _: bool,
    ) -> Result<LeaseKeepAliveResponse> {
        Err(Error::Unimplemented("keep-alive".into()))
    }

    async fn lease_time_to_live(
        &self,
        _: &Caller,
        _: LeaseTimeToLiveRequest,
        _: bool,
    ) -> Result<LeaseTimeToLiveResponse> {
        Err(Error::Unimplemented("ttl".into()))
    }

    async fn lease_leases(&self, c: &Caller, _: LeaseLeasesRequest) -> Result<LeaseLeasesResponse> {
        self.called_by(c);
        Err(Error::Unimplemented("leases".into()))
    }
}

/// A watch on which nothing ever happens; counts itself open until dropped.
struct Quiet(Arc<AtomicUsize>);

impl Drop for Quiet {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl WatchSession for Quiet {
    fn create(&self, _: WatchCreateRequest) {}
    fn cancel(&self, _: i64) {}
    fn progress(&self) {}
    async fn writable(&self) {}
    async fn next(&self) -> Option<(WatchResponse, bool)> {
        std::future::pending().await
    }
}

impl WatchBackend for Fake {
    fn open_watch(&self, c: Caller) -> Result<Box<dyn WatchSession>> {
        self.called_by(&c);
        self.open_watches.fetch_add(1, Ordering::SeqCst);
        self.watches_opened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Quiet(self.open_watches.clone())))
    }
}

/// Lets spawned cleanups run.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn an_abandoned_lock_closes_its_watch_and_leaves_the_line() {
    let fake = Arc::new(Fake::holding());
    let svc = LockService::new(fake.clone(), fake.clone(), Limits::default());
    // Lease 0: the lock gets a 60 s lease of its own, which names its key.
    let req = as_alice(LockRequest {
        name: b"l".to_vec(),
        lease: 0,
    });
    let waited = tokio::time::timeout(Duration::from_millis(200), svc.lock(req)).await;
    assert!(waited.is_err(), "the lock is held by an older key");
    assert_eq!(fake.watches_opened.load(Ordering::SeqCst), 1);
    settle().await;
    assert_eq!(fake.open_watches.load(Ordering::SeqCst), 0);
    let deletes = fake.deletes();
    assert_eq!(deletes.len(), 1, "the waiter's key is deleted once");
    let Some(request_op::Request::RequestDeleteRange(d)) = &deletes[0].success[0].request else {
        unreachable!()
    };
    assert_eq!(d.key, b"l/2b");
    fake.only_alice_called();
    let grants = fake.grants.lock().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].ttl, grants[0].id), (60, 0));
}

#[tokio::test]
async fn an_abandoned_campaign_closes_its_watch_and_withdraws() {
    let fake = Arc::new(Fake::holding());
    let svc = ElectionService::new(fake.clone(), fake.clone(), Limits::default());
    let req = as_alice(CampaignRequest {
        name: b"e".to_vec(),
        lease: 0x2a,
        value: b"v".to_vec(),
    });
    let waited = tokio::time::timeout(Duration::from_millis(200), svc.campaign(req)).await;
    assert!(waited.is_err(), "an older candidate leads");
    settle().await;
    assert_eq!(fake.open_watches.load(Ordering::SeqCst), 0);
    let deletes = fake.deletes();
    assert_eq!(deletes.len(), 1, "the candidate resigns once");
    // Only if the key is still the one this campaign made.
    let cmp = &deletes[0].compare[0];
    assert_eq!(cmp.key, b"e/2a");
    assert_eq!(
        cmp.target_union,
        Some(compare::TargetUnion::CreateRevision(REV))
    );
    assert!(
        fake.grants.lock().unwrap().is_empty(),
        "its own lease is used"
    );
    fake.only_alice_called();
}

#[tokio::test]
async fn a_dropped_observe_stream_closes_its_watch() {
    for fake in [Fake::holding(), Fake::default()] {
        let fake = Arc::new(fake);
        let svc = ElectionService::new(fake.clone(), fake.clone(), Limits::default());
        let stream = svc
            .observe(as_alice(LeaderRequest {
                name: b"e".to_vec(),
            }))
            .await
            .unwrap();
        // Following the leader's key, or waiting for a first candidate.
        for _ in 0..100 {
            if fake.watches_opened.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.open_watches.load(Ordering::SeqCst), 1);
        drop(stream);
        settle().await;
        assert_eq!(fake.open_watches.load(Ordering::SeqCst), 0);
        assert!(
            fake.txns.lock().unwrap().is_empty(),
            "observing writes nothing"
        );
        fake.only_alice_called();
    }
}

/// The Auth RPCs of the fake: it has no auth store.
macro_rules! no_auth_store {
    ($($rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[async_trait]
        impl AuthBackend for Fake {
            async fn caller(&self, creds: Credentials<'_>) -> Result<Caller> {
                match creds.token {
                    Some(TOKEN) => Ok(alice()),
                    Some(_) => Err(Error::InvalidAuthToken),
                    None => Ok(Caller::anonymous()),
                }
            }
            async fn authenticate(&self, _: AuthenticateRequest) -> Result<AuthenticateResponse> {
                Err(Error::AuthNotEnabled)
            }
            $(async fn $rpc(&self, _: &Caller, _: $req) -> Result<$resp> {
                Err(Error::AuthNotEnabled)
            })*
        }
    };
}

no_auth_store! {
    auth_enable(AuthEnableRequest) -> AuthEnableResponse;
    auth_disable(AuthDisableRequest) -> AuthDisableResponse;
    auth_status(AuthStatusRequest) -> AuthStatusResponse;
    user_add(AuthUserAddRequest) -> AuthUserAddResponse;
    user_get(AuthUserGetRequest) -> AuthUserGetResponse;
    user_list(AuthUserListRequest) -> AuthUserListResponse;
    user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
    user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
    user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
    user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
    role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
    role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
    role_list(AuthRoleListRequest) -> AuthRoleListResponse;
    role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
    role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
    role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}
