//! Who makes a call, and the `etcdserverpb.Auth` service.
//!
//! Every call's credentials are resolved once, here, into a [`Caller`] that the
//! backend methods receive: the token in gRPC metadata `token` (or `authorization`,
//! which etcd's HTTP gateway fills from the `Authorization` header), else the CN of a
//! verified client certificate ([`ClientCertificate`], set by the listener). The
//! backend decides what the credentials mean ([`AuthBackend::caller`]): with auth
//! disabled every call is anonymous; with it enabled a bad token is etcd's `invalid
//! auth token`, and permissions are checked by the backend (at apply time for writes,
//! as etcd does) against the caller's user and auth revision.

use std::sync::Arc;

use concord_proto::etcdserverpb::{auth_server::Auth, *};
use tonic::{Request, Response, Status};

use crate::error::Result;
pub use crate::tls::ClientCertificate;

/// The identity a call is made with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The authenticated user; `None` while auth is disabled, or when the call carries
    /// no credentials (then every permission check fails with `user name is empty`).
    pub user: Option<String>,
    /// The auth store's revision the credentials were checked at (etcd's
    /// `AuthInfo.Revision`): a write checked later against a newer auth store is
    /// refused with `revision of auth store is old`.
    pub revision: u64,
    /// The token the call presented, for a call the backend forwards to another
    /// member on the caller's behalf.
    pub token: Option<String>,
}

impl Caller {
    /// A call without credentials (or any call while auth is disabled).
    pub fn anonymous() -> Caller {
        Caller::default()
    }
}

/// What a call presents to prove who it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The auth token (metadata `token`, or `authorization`).
    pub token: Option<&'a str>,
    /// The CN of the client's verified certificate.
    pub common_name: Option<&'a str>,
}

/// gRPC metadata keys the token travels under (etcd's `rpctypes.TokenFieldNameGRPC`
/// and `TokenFieldNameSwagger`).
const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

/// The credentials of a call: its token and its client certificate's CN.
pub fn credentials<T>(req: &Request<T>) -> Credentials<'_> {
    let token = TOKEN_KEYS
        .iter()
        .find_map(|k| req.metadata().get(*k))
        .and_then(|v| v.to_str().ok());
    let common_name = req
        .extensions()
        .get::<ClientCertificate>()
        .map(|c| c.common_name.as_str());
    Credentials { token, common_name }
}

/// The Auth service's backend, and the resolution of every call's credentials.
#[tonic::async_trait]
pub trait AuthBackend: Send + Sync + 'static {
    /// Who the credentials name. With auth disabled: [`Caller::anonymous`]. With it
    /// enabled: the token's user (a token that is unknown, expired or of a deleted
    /// user is `invalid auth token`), else the certificate's CN, else anonymous.
    async fn caller(&self, creds: Credentials<'_>) -> Result<Caller>;

    async fn auth_enable(&self, c: &Caller, r: AuthEnableRequest) -> Result<AuthEnableResponse>;
    async fn auth_disable(&self, c: &Caller, r: AuthDisableRequest) -> Result<AuthDisableResponse>;
    async fn auth_status(&self, c: &Caller, r: AuthStatusRequest) -> Result<AuthStatusResponse>;
    async fn authenticate(&self, r: AuthenticateRequest) -> Result<AuthenticateResponse>;
    async fn user_add(&self, c: &Caller, r: AuthUserAddRequest) -> Result<AuthUserAddResponse>;
    async fn user_get(&self, c: &Caller, r: AuthUserGetRequest) -> Result<AuthUserGetResponse>;
    async fn user_list(&self, c: &Caller, r: AuthUserListRequest) -> Result<AuthUserListResponse>;
    async fn user_delete(
        &self,
        c: &Caller,
        r: AuthUserDeleteRequest,
    ) -> Result<AuthUserDeleteResponse>;
    async fn user_change_password(
        &self,
        c: &Caller,
        r: AuthUserChangePasswordRequest,
    ) -> Result<AuthUserChangePasswordResponse>;
    async fn user_grant_role(
        &self,
        c: &Caller,
        r: AuthUserGrantRoleRequest,
    ) -> Result<AuthUserGrantRoleResponse>;
    async fn user_revoke_role(
        &self,
        c: &Caller,
        r: AuthUserRevokeRoleRequest,
    ) -> Result<AuthUserRevokeRoleResponse>;
    async fn role_add(&self, c: &Caller, r: AuthRoleAddRequest) -> Result<AuthRoleAddResponse>;
    async fn role_get(&self, c: &Caller, r: AuthRoleGetRequest) -> Result<AuthRoleGetResponse>;
    async fn role_list(&self, c: &Caller, r: AuthRoleListRequest) -> Result<AuthRoleListResponse>;
    async fn role_delete(
        &self,
        c: &Caller,
        r: AuthRoleDeleteRequest,
    ) -> Result<AuthRoleDeleteResponse>;
    async fn role_grant_permission(
        &self,
        c: &Caller,
        r: AuthRoleGrantPermissionRequest,
    ) -> Result<AuthRoleGrantPermissionResponse>;
    async fn role_revoke_permission(
        &self,
        c: &Caller,
        r: AuthRoleRevokePermissionRequest,
    ) -> Result<AuthRoleRevokePermissionResponse>;
}

/// Resolves a call's [`Caller`] through `auth`.
pub(crate) async fn caller_of<T>(
    auth: &dyn AuthBackend,
    req: &Request<T>,
) -> Result<Caller, Status> {
    Ok(auth.caller(credentials(req)).await?)
}

/// Serves Auth over any [`AuthBackend`].
pub struct AuthService {
    backend: Arc<dyn AuthBackend>,
}

impl AuthService {
    pub fn new(backend: Arc<dyn AuthBackend>) -> Self {
        Self { backend }
    }
}

/// The Auth service: every RPC but `Authenticate` resolves the caller first and hands
/// it with the request to the backend.
macro_rules! auth_service {
    ($($rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl Auth for AuthService {
            $(async fn $rpc(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                let caller = caller_of(&*self.backend, &req).await?;
                Ok(Response::new(self.backend.$rpc(&caller, req.into_inner()).await?))
            })*

            async fn authenticate(
                &self,
                req: Request<AuthenticateRequest>,
            ) -> Result<Response<AuthenticateResponse>, Status> {
                Ok(Response::new(self.backend.authenticate(req.into_inner()).await?))
            }
        }
    };
}

auth_service! {
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
