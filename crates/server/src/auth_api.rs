//! The Auth service of a member ([`AuthApi`]), and the resolution of every call's
//! credentials into a [`Caller`].
//!
//! Changes go through the log (as etcd); passwords are hashed here, on the member
//! that receives the request, before the change is proposed, so the log never holds
//! a plaintext password. Gets and lists are answered from this member's copy after a
//! linearizable read point. `Authenticate` checks the password here (bcrypt, off the
//! async threads), then proposes the token so every member knows it.

use std::sync::Arc;

use concord_gateway::{AuthBackend, Caller, Credentials, Error as ApiError, Result as ApiResult};
use concord_proto::etcdserverpb as pb;

use crate::apply::{Applied, Command};
use crate::auth::{AuthChange, AuthError};
use crate::core::{Core, shares_core, unexpected};

/// Auth: the auth store's RPCs and the callers of every other service.
pub struct AuthApi {
    pub(crate) core: Arc<Core>,
}

shares_core!(AuthApi);

/// How many times `Authenticate` checks the password again when the auth store
/// changed between the check and the apply of its token.
const AUTHENTICATE_ATTEMPTS: usize = 5;

impl AuthApi {
    /// Proposes an auth change as `c`; the answer's header.
    async fn change(
        &self,
        c: &Caller,
        change: AuthChange,
    ) -> ApiResult<Option<pb::ResponseHeader>> {
        match self.propose_as(c, Command::Auth(change)).await? {
            Applied::Auth { revision, .. } => Ok(self.header(revision)),
            other => Err(unexpected(&other)),
        }
    }

    /// The bcrypt hash of a password, off the async threads.
    async fn hash(&self, password: String) -> ApiResult<String> {
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || auth.hash_password(&password))
            .await
            .map_err(|e| ApiError::Internal(format!("etcdserver: hashing task failed: {e}")))?
    }

    /// The hash a request's password becomes: the client's own bcrypt hash if it sent
    /// one (etcd 3.5's `hashedPassword`), else the password hashed here.
    async fn password_hash(&self, password: String, hashed: String) -> ApiResult<String> {
        if !hashed.is_empty() {
            if bcrypt_cost_of(&hashed).is_none() {
                return Err(ApiError::Internal(
                    "etcdserver: hashedPassword is not a bcrypt hash".into(),
                ));
            }
            return Ok(hashed);
        }
        self.hash(password).await
    }

    /// Waits (a bounded time) until this member has applied the log entry a simple
    /// token was registered at: a token from another member may be that fresh.
    async fn wait_applied(&self, index: u64) {
        let mut state = self.raft.subscribe();
        let _ = tokio::time::timeout(self.request_timeout, state.wait_for(|s| s.applied >= index))
            .await;
    }

    /// The header of a read of this member's copy, after a linearizable read point.
    async fn read_header(&self) -> ApiResult<Option<pb::ResponseHeader>> {
        self.linearize().await?;
        Ok(self.header(self.store.current_revision()))
    }
}

/// The cost of a bcrypt hash (`$2a$10$...`), if it is one.
fn bcrypt_cost_of(hash: &str) -> Option<u32> {
    let mut parts = hash.split('$');
    let (empty, version, cost, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = empty.is_empty()
        && matches!(version, "2a" | "2b" | "2y")
        && rest.len() == 53
        && parts.next().is_none();
    ok.then(|| cost.parse().ok()).flatten()
}

/// The log index a simple token (`<16 letters>.<index>`) was registered at.
fn token_index(token: &str) -> Option<u64> {
    let (_, index) = token.split_once('.')?;
    index.parse().ok()
}

#[concord_gateway::async_trait]
impl AuthBackend for AuthApi {
    async fn caller(&self, creds: Credentials<'_>) -> ApiResult<Caller> {
        if let Some(token) = creds.token.filter(|t| !t.is_empty()) {
            // A token is checked even while auth is disabled (as etcd: after `auth
            // disable` every simple token is gone, so it is invalid).
            if !self.auth.uses_jwt() {
                let index = token_index(token).ok_or(ApiError::InvalidAuthToken)?;
                if index > self.raft.status().applied {
                    self.wait_applied(index).await;
                }
            }
            return Ok(self.auth.token_caller(token)?);
        }
        if !self.auth.enabled() {
            return Ok(Caller::anonymous());
        }
        Ok(match creds.common_name {
            Some(cn) => self.auth.cert_caller(cn),
            None => Caller::anonymous(),
        })
    }

    async fn auth_enable(
        &self,
        c: &Caller,
        _: pb::AuthEnableRequest,
    ) -> ApiResult<pb::AuthEnableResponse> {
        Ok(pb::AuthEnableResponse {
            header: self.change(c, AuthChange::Enable).await?,
        })
    }

    async fn auth_disable(
        &self,
        c: &Caller,
        _: pb::AuthDisableRequest,
    ) -> ApiResult<pb::AuthDisableResponse> {
        Ok(pb::AuthDisableResponse {
            header: self.change(c, AuthChange::Disable).await?,
        })
    }

    async fn auth_status(
        &self,
        _: &Caller,
        _: pb::AuthStatusRequest,
    ) -> ApiResult<pb::AuthStatusResponse> {
        let header = self.read_header().await?;
        let (enabled, auth_revision) = self.auth.status();
        Ok(pb::AuthStatusResponse {
            header,
            enabled,
            auth_revision,
        })
    }

    async fn authenticate(
        &self,
        req: pb::AuthenticateRequest,
    ) -> ApiResult<pb::AuthenticateResponse> {
        let pb::AuthenticateRequest { name, password } = req;
        for _ in 0..AUTHENTICATE_ATTEMPTS {
            self.linearize().await?;
            let auth = self.auth.clone();
            let (n, p) = (name.clone(), password.clone());
            let revision = tokio::task::spawn_blocking(move || auth.check_password(&n, &p))
                .await
                .map_err(|e| {
                    ApiError::Internal(format!("etcdserver: password check failed: {e}"))
                })??;
            let jwt = self.auth.uses_jwt();
            let change = AuthChange::Authenticate {
                name: name.clone(),
                // A JWT needs no prefix: it is signed here once the log agrees.
                token_prefix: if jwt {
                    String::new()
                } else {
                    crate::auth::token_prefix()
                },
                revision,
            };
            match self.propose(Command::Auth(change)).await {
                Ok(Applied::Auth {
                    revision: kv_revision,
                    token,
                }) => {
                    let token = match token {
                        Some(t) => t,
                        None if jwt => self.auth.sign_jwt(&name, revision)?,
                        None => {
                            return Err(ApiError::Internal(
                                "etcdserver: authenticated without a token".into(),
                            ));
                        }
                    };
                    return Ok(pb::AuthenticateResponse {
                        header: self.header(kv_revision),
                        token,
                    });
                }
                Ok(other) => return Err(unexpected(&other)),
                // The store changed since the password was checked: check it again.
                Err(ApiError::AuthOldRevision) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::AuthOldRevision)
    }

    async fn user_add(
        &self,
        c: &Caller,
        req: pb::AuthUserAddRequest,
    ) -> ApiResult<pb::AuthUserAddResponse> {
        // Checked before hashing, so a refused request costs no bcrypt round.
        self.admin(c)?;
        if req.name.is_empty() {
            return Err(ApiError::UserEmpty);
        }
        let no_password = req.options.is_some_and(|o| o.no_password);
        let hashed_password = if no_password {
            String::new()
        } else {
            self.password_hash(req.password, req.hashed_password)
                .await?
        };
        let change = AuthChange::UserAdd(pb::AuthUserAddRequest {
            name: req.name,
            password: String::new(),
            options: req.options,
            hashed_password,
        });
        Ok(pb::AuthUserAddResponse {
            header: self.change(c, change).await?,
        })
    }

    async fn user_get(
        &self,
        c: &Caller,
        req: pb::AuthUserGetRequest,
    ) -> ApiResult<pb::AuthUserGetResponse> {
        let header = self.read_header().await?;
        Ok(pb::AuthUserGetResponse {
            header,
            roles: self.auth.user_get(c, &req.name)?,
        })
    }

    async fn user_list(
        &self,
        c: &Caller,
        _: pb::AuthUserListRequest,
    ) -> ApiResult<pb::AuthUserListResponse> {
        let header = self.read_header().await?;
        Ok(pb::AuthUserListResponse {
            header,
            users: self.auth.user_list(c)?,
        })
    }

    async fn user_delete(
        &self,
        c: &Caller,
        req: pb::AuthUserDeleteRequest,
    ) -> ApiResult<pb::AuthUserDeleteResponse> {
        Ok(pb::AuthUserDeleteResponse {
            header: self.change(c, AuthChange::UserDelete(req)).await?,
        })
    }

    async fn user_change_password(
        &self,
        c: &Caller,
        req: pb::AuthUserChangePasswordRequest,
    ) -> ApiResult<pb::AuthUserChangePasswordResponse> {
        self.admin(c)?;
        let hashed_password = self
            .password_hash(req.password, req.hashed_password)
            .await?;
        let change = AuthChange::UserChangePassword(pb::AuthUserChangePasswordRequest {
            name: req.name,
            password: String::new(),
            hashed_password,
        });
        Ok(pb::AuthUserChangePasswordResponse {
            header: self.change(c, change).await?,
        })
    }

    async fn user_grant_role(
        &self,
        c: &Caller,
        req: pb::AuthUserGrantRoleRequest,
    ) -> ApiResult<pb::AuthUserGrantRoleResponse> {
        Ok(pb::AuthUserGrantRoleResponse {
            header: self.change(c, AuthChange::UserGrantRole(req)).await?,
        })
    }

    async fn user_revoke_role(
        &self,
        c: &Caller,
        req: pb::AuthUserRevokeRoleRequest,
    ) -> ApiResult<pb::AuthUserRevokeRoleResponse> {
        Ok(pb::AuthUserRevokeRoleResponse {
            header: self.change(c, AuthChange::UserRevokeRole(req)).await?,
        })
    }

    async fn role_add(
        &self,
        c: &Caller,
        req: pb::AuthRoleAddRequest,
    ) -> ApiResult<pb::AuthRoleAddResponse> {
        Ok(pb::AuthRoleAddResponse {
            header: self.change(c, AuthChange::RoleAdd(req)).await?,
        })
    }

    async fn role_get(
        &self,
        c: &Caller,
        req: pb::AuthRoleGetRequest,
    ) -> ApiResult<pb::AuthRoleGetResponse> {
        let header = self.read_header().await?;
        Ok(pb::AuthRoleGetResponse {
            header,
            perm: self.auth.role_get(c, &req.role)?,
        })
    }

    async fn role_list(
        &self,
        c: &Caller,
        _: pb::AuthRoleListRequest,
    ) -> ApiResult<pb::AuthRoleListResponse> {
        let header = self.read_header().await?;
        Ok(pb::AuthRoleListResponse {
            header,
            roles: self.auth.role_list(c)?,
        })
    }

    async fn role_delete(
        &self,
        c: &Caller,
        req: pb::AuthRoleDeleteRequest,
    ) -> ApiResult<pb::AuthRoleDeleteResponse> {
        Ok(pb::AuthRoleDeleteResponse {
            header: self.change(c, AuthChange::RoleDelete(req)).await?,
        })
    }

    async fn role_grant_permission(
        &self,
        c: &Caller,
        req: pb::AuthRoleGrantPermissionRequest,
    ) -> ApiResult<pb::AuthRoleGrantPermissionResponse> {
        // Refused here too, so the log never holds the request etcd 3.4 panicked on.
        if req.perm.is_none() {
            return Err(AuthError::PermissionNotGiven.into());
        }
        Ok(pb::AuthRoleGrantPermissionResponse {
            header: self.change(c, AuthChange::RoleGrantPermission(req)).await?,
        })
    }

    async fn role_revoke_permission(
        &self,
        c: &Caller,
        req: pb::AuthRoleRevokePermissionRequest,
    ) -> ApiResult<pb::AuthRoleRevokePermissionResponse> {
        Ok(pb::AuthRoleRevokePermissionResponse {
            header: self
                .change(c, AuthChange::RoleRevokePermission(req))
                .await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_hashes_and_token_indexes_are_recognised() {
        let h = bcrypt::hash("pw", 4).unwrap();
        assert_eq!(bcrypt_cost_of(&h), Some(4));
        assert_eq!(bcrypt_cost_of("plaintext"), None);
        assert_eq!(bcrypt_cost_of("$2a$10$short"), None);
        assert_eq!(token_index("cuLhHBozvACwbwmx.304"), Some(304));
        assert_eq!(token_index("nodot"), None);
        assert_eq!(token_index("a.b"), None);
    }
}
