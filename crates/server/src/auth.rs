//! etcd's auth store as replicated state: users, roles, their permissions, the
//! enabled flag and the auth revision, with etcd's rules for changing them and for
//! checking a caller's permissions.
//!
//! Every change arrives as an applied command, so every member holds the same store.
//! Users and roles are records of the store's aux tables `authuser` and `authrole`
//! (key: the name; value: `authpb.User` / `authpb.Role`, the user's password as its
//! bcrypt hash), the flag and the revision records of table `auth`; they are written
//! in the batch of the command, kept across restarts and carried in snapshot images.
//! The in-memory copy mirrors the records for the checks every request makes.
//!
//! Passwords are hashed by the member that receives the request, before it proposes
//! the change: the log, the store, images and logs only ever hold the hash.
//!
//! Simple tokens (`--auth-token simple`) are member-local, as in etcd: an applied
//! `Authenticate` registers its token on every member; a token lives for
//! `--auth-token-ttl` after its last use, and goes with a password change, the deletion
//! of its user, or `auth disable`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use concord_gateway::{Caller, Error as ApiError};
use concord_mvcc as mvcc;
use concord_proto::authpb;
use concord_proto::etcdserverpb as pb;
use prost::Message as _;

/// Aux table of users: name → `authpb.User`.
pub const USERS: &str = "authuser";
/// Aux table of roles: name → `authpb.Role`.
pub const ROLES: &str = "authrole";
/// Aux table of the store's own records ([`ENABLED_KEY`], [`REVISION_KEY`]).
pub const META: &str = "auth";
const ENABLED_KEY: &[u8] = b"enabled";
const REVISION_KEY: &[u8] = b"revision";

/// The user and role that may do anything (etcd's `root`).
pub const ROOT: &str = "root";

/// etcd's `bcrypt.DefaultCost`, and the range of costs it accepts.
pub const DEFAULT_BCRYPT_COST: u32 = 10;
const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

/// Why the auth store refused a request: etcd's auth errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExist,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExist,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("authentication failed, password was given for no password user")]
    NoPasswordUser,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("permission not given")]
    PermissionNotGiven,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("invalid auth token")]
    InvalidAuthToken,
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    #[error("revision of auth store is old")]
    AuthOldRevision,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::RootUserNotExist => ApiError::RootUserNotExist,
            AuthError::RootRoleNotExist => ApiError::RootRoleNotExist,
            AuthError::UserAlreadyExist => ApiError::UserAlreadyExist,
            AuthError::UserEmpty => ApiError::UserEmpty,
            AuthError::UserNotFound => ApiError::UserNotFound,
            AuthError::RoleAlreadyExist => ApiError::RoleAlreadyExist,
            AuthError::RoleNotFound => ApiError::RoleNotFound,
            AuthError::RoleEmpty => ApiError::RoleEmpty,
            AuthError::AuthFailed => ApiError::AuthFailed,
            AuthError::PermissionDenied => ApiError::PermissionDenied,
            AuthError::RoleNotGranted => ApiError::RoleNotGranted,
            AuthError::PermissionNotGranted => ApiError::PermissionNotGranted,
            AuthError::PermissionNotGiven => ApiError::PermissionNotGiven,
            AuthError::AuthNotEnabled => ApiError::AuthNotEnabled,
            AuthError::InvalidAuthToken => ApiError::InvalidAuthToken,
            AuthError::InvalidAuthMgmt => ApiError::InvalidAuthMgmt,
            AuthError::AuthOldRevision => ApiError::AuthOldRevision,
            // etcd has no gRPC mapping for it: code Unknown with the auth store's text.
            e @ AuthError::NoPasswordUser => ApiError::Internal(format!("auth: {e}")),
        }
    }
}

impl AuthError {
    /// As etcd's Maintenance service returns an auth error (`Defragment`, `Snapshot`,
    /// `Hash`, `HashKV`): unmapped, so code `Unknown` and the auth store's own text.
    pub fn unmapped(self) -> ApiError {
        ApiError::Internal(format!("auth: {self}"))
    }
}

pub type Result<T, E = AuthError> = std::result::Result<T, E>;

/// The access a request needs to a key or range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    fn granted_by(self, perm_type: i32) -> bool {
        use authpb::permission::Type;
        match Type::try_from(perm_type) {
            Ok(Type::Readwrite) => true,
            Ok(Type::Read) => self == Access::Read,
            Ok(Type::Write) => self == Access::Write,
            Err(_) => false,
        }
    }
}

/// A half-open key interval; `None` as the end is +infinity.
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// The interval a stored permission grants: a single key when its `range_end` is
/// empty, every key from `key` on when it is `"\0"`, else `[key, range_end)`.
fn granted_interval(p: &authpb::Permission) -> Interval {
    match p.range_end.as_slice() {
        [] => {
            let mut end = p.key.clone();
            end.push(0);
            (p.key.clone(), Some(end))
        }
        [0] => (p.key.clone(), None),
        end => (p.key.clone(), Some(end.to_vec())),
    }
}

/// Whether the union of `granted` covers the request: the single key `key` when
/// `range_end` is empty, else `[key, range_end)` (`"\0"`: every key from `key` on).
fn covers(mut granted: Vec<Interval>, key: &[u8], range_end: &[u8]) -> bool {
    let below_end = |k: &[u8], end: &Option<Vec<u8>>| end.as_ref().is_none_or(|e| k < e.as_slice());
    if range_end.is_empty() {
        return granted
            .iter()
            .any(|(b, e)| b.as_slice() <= key && below_end(key, e));
    }
    let want_end: Option<&[u8]> = (range_end != [0]).then_some(range_end);
    if want_end.is_some_and(|e| e <= key) {
        // An empty (or inverted) range reads nothing; etcd finds no interval for it.
        return false;
    }
    granted.sort();
    // Sweep from `key`: every interval starting at or before the covered end extends it.
    let mut covered: Option<Vec<u8>> = Some(key.to_vec());
    for (b, e) in granted {
        let Some(upto) = covered.clone() else { break };
        if !below_end(&b, &e) || e.as_ref().is_some_and(|e| e.as_slice() <= upto.as_slice()) {
            continue;
        }
        if b > upto {
            break;
        }
        covered = e;
    }
    match (covered, want_end) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(c), Some(w)) => c.as_slice() >= w,
    }
}

#[derive(Debug, Default, Clone)]
struct State {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, authpb::User>,
    roles: BTreeMap<String, authpb::Role>,
}

impl State {
    fn has_root_role(u: &authpb::User) -> bool {
        u.roles.iter().any(|r| r == ROOT)
    }

    /// etcd's `IsAdminPermitted`: no revision check.
    fn admin(&self, user: Option<&str>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let name = user.filter(|u| !u.is_empty()).ok_or(AuthError::UserEmpty)?;
        let u = self.users.get(name).ok_or(AuthError::UserNotFound)?;
        if State::has_root_role(u) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's `isOpPermitted`.
    fn permitted(
        &self,
        user: Option<&str>,
        revision: u64,
        key: &[u8],
        range_end: &[u8],
        access: Access,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let name = match user {
            Some(u) if !u.is_empty() && revision != 0 => u,
            _ => return Err(AuthError::UserEmpty),
        };
        if revision < self.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let u = self.users.get(name).ok_or(AuthError::PermissionDenied)?;
        if State::has_root_role(u) {
            return Ok(());
        }
        let granted: Vec<Interval> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| &r.key_permission)
            .filter(|p| access.granted_by(p.perm_type))
            .map(granted_interval)
            .collect();
        if covers(granted, key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }
}

/// Who a replicated command was proposed by, as the apply path checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub user: String,
    pub revision: u64,
}

impl Requester {
    pub fn of(c: &Caller) -> Requester {
        Requester {
            user: c.user.clone().unwrap_or_default(),
            revision: c.revision,
        }
    }

    fn user(&self) -> Option<&str> {
        Some(self.user.as_str()).filter(|u| !u.is_empty())
    }
}

/// Simple tokens: member-local, each alive for a TTL after its last use.
#[derive(Debug, Default)]
struct Tokens {
    by_token: HashMap<String, (String, Instant)>,
}

/// The auth store of a member.
#[derive(Debug)]
pub struct AuthStore {
    state: RwLock<State>,
    tokens: Mutex<Tokens>,
    jwt: Option<Jwt>,
    token_ttl: Duration,
    bcrypt_cost: u32,
}

/// How a member runs its auth store.
#[derive(Debug, Clone)]
pub struct AuthOptions {
    /// `--auth-token-ttl`: how long a simple token lives after its last use.
    pub token_ttl: Duration,
    /// `--bcrypt-cost`; out of etcd's range [4, 31] it is etcd's default, 10.
    pub bcrypt_cost: u32,
    /// `--auth-token jwt,...`: signed tokens instead of simple ones.
    pub jwt: Option<JwtOptions>,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            token_ttl: Duration::from_secs(300),
            bcrypt_cost: DEFAULT_BCRYPT_COST,
            jwt: None,
        }
    }
}

/// `--auth-token jwt,pub-key=PATH,priv-key=PATH,sign-method=METHOD,ttl=DURATION`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtOptions {
    pub pub_key: std::path::PathBuf,
    /// Without it this member verifies tokens but issues none.
    pub priv_key: Option<std::path::PathBuf>,
    /// `RS256`, `ES256` or `EdDSA`.
    pub sign_method: String,
    /// etcd's default: 5 minutes.
    pub ttl: Duration,
}

impl JwtOptions {
    /// Parses the value of `--auth-token` after `jwt,`.
    pub fn parse(opts: &str) -> std::result::Result<JwtOptions, String> {
        let (mut pub_key, mut priv_key, mut method, mut ttl) = (None, None, None, None);
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            match k {
                "pub-key" => pub_key = Some(std::path::PathBuf::from(v)),
                "priv-key" => priv_key = Some(std::path::PathBuf::from(v)),
                "sign-method" => method = Some(v.to_string()),
                "ttl" => {
                    ttl = Some(
                        crate::config::parse_go_duration(v)
                            .filter(|d| !d.is_zero())
                            .ok_or_else(|| format!("invalid ttl {v:?}"))?,
                    )
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        let sign_method = method.ok_or("sign-method is required")?;
        if jwt_algorithm(&sign_method).is_none() {
            return Err(format!(
                "unsupported sign-method {sign_method:?} (use RS256, ES256 or EdDSA)"
            ));
        }
        Ok(JwtOptions {
            pub_key: pub_key.ok_or("pub-key is required")?,
            priv_key,
            sign_method,
            ttl: ttl.unwrap_or(Duration::from_secs(300)),
        })
    }
}

fn jwt_algorithm(method: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm;
    Some(match method {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// etcd's JWT claims.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Claims {
    exp: u64,
    revision: u64,
    username: String,
}

/// Signs and verifies JWT tokens.
struct Jwt {
    algorithm: jsonwebtoken::Algorithm,
    decoding: jsonwebtoken::DecodingKey,
    encoding: Option<jsonwebtoken::EncodingKey>,
    ttl: Duration,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithm", &self.algorithm)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Jwt {
    fn load(o: &JwtOptions) -> std::result::Result<Jwt, String> {
        use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
        let algorithm = jwt_algorithm(&o.sign_method).ok_or("unsupported sign-method")?;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("reading JWT key {}: {e}", p.display()))
        };
        fn bad(
            p: &std::path::Path,
            method: &str,
        ) -> impl FnOnce(jsonwebtoken::errors::Error) -> String {
            let what = format!("JWT key {} for {method}", p.display());
            move |e| format!("{what}: {e}")
        }
        let pem = read(&o.pub_key)?;
        let decoding = match algorithm {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
            _ => DecodingKey::from_ed_pem(&pem),
        }
        .map_err(bad(&o.pub_key, &o.sign_method))?;
        let encoding = match &o.priv_key {
            None => None,
            Some(p) => {
                let pem = read(p)?;
                Some(
                    match algorithm {
                        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
                        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                        _ => EncodingKey::from_ed_pem(&pem),
                    }
                    .map_err(bad(p, &o.sign_method))?,
                )
            }
        };
        Ok(Jwt {
            algorithm,
            decoding,
            encoding,
            ttl: o.ttl,
        })
    }

    fn sign(&self, username: &str, revision: u64) -> std::result::Result<String, ApiError> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            ApiError::Internal("etcdserver: this member has no JWT signing key (priv-key)".into())
        })?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let claims = Claims {
            exp: (now + self.ttl).as_secs(),
            revision,
            username: username.to_string(),
        };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.algorithm), &claims, key)
            .map_err(|e| ApiError::Internal(format!("etcdserver: signing a token: {e}")))
    }

    fn verify(&self, token: &str) -> Result<Caller> {
        let mut v = jsonwebtoken::Validation::new(self.algorithm);
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(|_| AuthError::InvalidAuthToken)?;
        Ok(Caller {
            user: Some(data.claims.username),
            revision: data.claims.revision,
            token: Some(token.to_string()),
        })
    }
}

fn load(store: &mvcc::Store) -> std::result::Result<State, String> {
    let err = |e: mvcc::Error| e.to_string();
    let mut st = State {
        revision: 1,
        ..State::default()
    };
    if let Some(v) = store.aux(META, ENABLED_KEY).map_err(err)? {
        st.enabled = v.first() == Some(&1);
    }
    if let Some(v) = store.aux(META, REVISION_KEY).map_err(err)? {
        let b: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| format!("auth revision record of {} bytes", v.len()))?;
        st.revision = u64::from_be_bytes(b);
    }
    for (k, v) in store.aux_scan(USERS).map_err(err)? {
        let u = authpb::User::decode(v.as_slice()).map_err(|e| format!("auth user record: {e}"))?;
        let name = String::from_utf8(k).map_err(|_| "auth user name is not UTF-8".to_string())?;
        st.users.insert(name, u);
    }
    for (k, v) in store.aux_scan(ROLES).map_err(err)? {
        let r = authpb::Role::decode(v.as_slice()).map_err(|e| format!("auth role record: {e}"))?;
        let name = String::from_utf8(k).map_err(|_| "auth role name is not UTF-8".to_string())?;
        st.roles.insert(name, r);
    }
    Ok(st)
}

/// A random 16-letter token prefix, as etcd's simple tokens have.
pub fn token_prefix() -> String {
    use rand::Rng;
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char)
        .collect()
}

impl AuthStore {
    /// Loads the auth records of `store`.
    pub fn open(store: &mvcc::Store, opts: AuthOptions) -> std::result::Result<AuthStore, String> {
        Ok(AuthStore {
            state: RwLock::new(load(store)?),
            tokens: Mutex::new(Tokens::default()),
            jwt: opts.jwt.as_ref().map(Jwt::load).transpose()?,
            token_ttl: opts.token_ttl,
            bcrypt_cost: if BCRYPT_COSTS.contains(&opts.bcrypt_cost) {
                opts.bcrypt_cost
            } else {
                DEFAULT_BCRYPT_COST
            },
        })
    }

    /// Replaces the state with the store's records (after a snapshot was installed).
    pub fn reload(&self, store: &mvcc::Store) -> std::result::Result<(), String> {
        let st = load(store)?;
        *self.write() = st;
        self.tokens().by_token.clear();
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn enabled(&self) -> bool {
        self.read().enabled
    }

    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// etcd's `IsAdminPermitted` for a caller.
    pub fn check_admin(&self, c: &Caller) -> Result<()> {
        self.read().admin(c.user.as_deref())
    }

    /// Whether `c` may access the key (empty `range_end`) or range.
    pub fn check(&self, c: &Caller, key: &[u8], range_end: &[u8], access: Access) -> Result<()> {
        self.read()
            .permitted(c.user.as_deref(), c.revision, key, range_end, access)
    }

    /// Whether tokens are JWTs (`--auth-token jwt,...`).
    pub fn uses_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// A JWT for `username`, checked against auth revision `revision`.
    pub fn sign_jwt(&self, username: &str, revision: u64) -> std::result::Result<String, ApiError> {
        match &self.jwt {
            Some(j) => j.sign(username, revision),
            None => Err(ApiError::Internal(
                "etcdserver: JWT tokens are not configured".into(),
            )),
        }
    }

    /// The caller a token names. A JWT carries the auth revision it was issued at
    /// (it goes stale with any later change of the store); a simple token names its
    /// user at the current revision (a change between this check and the apply of a
    /// write is caught there), and each use extends its life.
    pub fn token_caller(&self, token: &str) -> Result<Caller> {
        if let Some(j) = &self.jwt {
            return j.verify(token);
        }
        let now = Instant::now();
        let mut tokens = self.tokens();
        let Some((user, expires)) = tokens.by_token.get_mut(token) else {
            return Err(AuthError::InvalidAuthToken);
        };
        if *expires <= now {
            tokens.by_token.remove(token);
            return Err(AuthError::InvalidAuthToken);
        }
        *expires = now + self.token_ttl;
        let user = user.clone();
        drop(tokens);
        Ok(Caller {
            user: Some(user),
            revision: self.revision(),
            token: Some(token.to_string()),
        })
    }

    /// The caller a verified client certificate's CN names, at the current revision.
    pub fn cert_caller(&self, common_name: &str) -> Caller {
        Caller {
            user: Some(common_name.to_string()),
            revision: self.revision(),
            token: None,
        }
    }

    /// Checks `name`'s password (bcrypt; slow: call it off the async threads) and
    /// returns the auth revision it was checked at.
    pub fn check_password(&self, name: &str, password: &str) -> Result<u64> {
        let (hash, revision) = {
            let st = self.read();
            if !st.enabled {
                return Err(AuthError::AuthNotEnabled);
            }
            let u = st.users.get(name).ok_or(AuthError::AuthFailed)?;
            if u.options.is_some_and(|o| o.no_password) {
                return Err(AuthError::NoPasswordUser);
            }
            (u.password.clone(), st.revision)
        };
        let hash = std::str::from_utf8(&hash).map_err(|_| AuthError::AuthFailed)?;
        match bcrypt::verify(password, hash) {
            Ok(true) => Ok(revision),
            _ => Err(AuthError::AuthFailed),
        }
    }

    /// The bcrypt hash of a password, at the configured cost (slow: call it off the
    /// async threads).
    pub fn hash_password(&self, password: &str) -> std::result::Result<String, ApiError> {
        bcrypt::hash(password, self.bcrypt_cost)
            .map_err(|e| ApiError::Internal(format!("etcdserver: hashing the password: {e}")))
    }

    pub fn status(&self) -> (bool, u64) {
        let st = self.read();
        (st.enabled, st.revision)
    }

    /// `UserGet`: root, or the user itself.
    pub fn user_get(&self, c: &Caller, name: &str) -> Result<Vec<String>> {
        let st = self.read();
        if let Err(e) = st.admin(c.user.as_deref())
            && c.user.as_deref() != Some(name)
        {
            return Err(e);
        }
        st.users
            .get(name)
            .map(|u| u.roles.clone())
            .ok_or(AuthError::UserNotFound)
    }

    /// `RoleGet`: root, or a user that has the role.
    pub fn role_get(&self, c: &Caller, role: &str) -> Result<Vec<authpb::Permission>> {
        let st = self.read();
        if let Err(e) = st.admin(c.user.as_deref()) {
            let has = c
                .user
                .as_deref()
                .and_then(|u| st.users.get(u))
                .is_some_and(|u| u.roles.iter().any(|r| r == role));
            if !has {
                return Err(e);
            }
        }
        st.roles
            .get(role)
            .map(|r| r.key_permission.clone())
            .ok_or(AuthError::RoleNotFound)
    }

    pub fn user_list(&self, c: &Caller) -> Result<Vec<String>> {
        let st = self.read();
        st.admin(c.user.as_deref())?;
        Ok(st.users.keys().cloned().collect())
    }

    pub fn role_list(&self, c: &Caller) -> Result<Vec<String>> {
        let st = self.read();
        st.admin(c.user.as_deref())?;
        Ok(st.roles.keys().cloned().collect())
    }

    fn drop_tokens_of(&self, user: &str) {
        self.tokens().by_token.retain(|_, (u, _)| u != user);
    }

    /// Applies an auth change proposed by `by` (the apply path's check of who may
    /// change the store is here: root only, or anyone while auth is disabled).
    /// `index`: the entry's log index (a simple token ends with it).
    pub fn apply(
        &self,
        w: &mut mvcc::Writer<'_>,
        by: &Requester,
        cmd: &AuthChange,
        index: u64,
    ) -> Result<Option<String>> {
        let mut st = self.write();
        if !matches!(cmd, AuthChange::Authenticate { .. }) {
            st.admin(by.user())?;
        }
        let mut next = st.clone();
        let mut bump = true;
        let mut token = None;
        match cmd {
            AuthChange::Enable => {
                bump = false;
                if !next.enabled {
                    let root = next.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                    if !State::has_root_role(root) {
                        return Err(AuthError::RootRoleNotExist);
                    }
                    next.enabled = true;
                    w.put_aux(META, ENABLED_KEY, &[1]);
                }
            }
            AuthChange::Disable => {
                if next.enabled {
                    next.enabled = false;
                    w.put_aux(META, ENABLED_KEY, &[0]);
                    self.tokens().by_token.clear();
                } else {
                    bump = false;
                }
            }
            AuthChange::Authenticate {
                name,
                token_prefix,
                revision,
            } => {
                bump = false;
                if !next.enabled {
                    return Err(AuthError::AuthNotEnabled);
                }
                let u = next.users.get(name).ok_or(AuthError::AuthFailed)?;
                if u.options.is_some_and(|o| o.no_password) {
                    return Err(AuthError::AuthFailed);
                }
                // The password was checked against an older store: check again.
                if *revision != next.revision {
                    return Err(AuthError::AuthOldRevision);
                }
                // A JWT is signed by the proposer; a simple token is known everywhere.
                if !token_prefix.is_empty() {
                    let t = format!("{token_prefix}.{index}");
                    self.tokens()
                        .by_token
                        .insert(t.clone(), (name.clone(), Instant::now() + self.token_ttl));
                    token = Some(t);
                }
            }
            AuthChange::UserAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if next.users.contains_key(&r.name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                let no_password = r.options.is_some_and(|o| o.no_password);
                let u = authpb::User {
                    name: r.name.clone().into_bytes(),
                    password: if no_password {
                        Vec::new()
                    } else {
                        r.hashed_password.clone().into_bytes()
                    },
                    roles: Vec::new(),
                    options: Some(authpb::UserAddOptions { no_password }),
                };
                put_user(w, &u);
                next.users.insert(r.name.clone(), u);
            }
            AuthChange::UserDelete(r) => {
                if next.enabled && r.name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                next.users.remove(&r.name).ok_or(AuthError::UserNotFound)?;
                w.delete_aux(USERS, r.name.as_bytes());
                self.drop_tokens_of(&r.name);
            }
            AuthChange::UserChangePassword(r) => {
                let u = next.users.get_mut(&r.name).ok_or(AuthError::UserNotFound)?;
                if !u.options.is_some_and(|o| o.no_password) {
                    u.password = r.hashed_password.clone().into_bytes();
                }
                put_user(w, u);
                self.drop_tokens_of(&r.name);
            }
            AuthChange::UserGrantRole(r) => {
                let u = next.users.get_mut(&r.user).ok_or(AuthError::UserNotFound)?;
                if r.role != ROOT && !st.roles.contains_key(&r.role) {
                    return Err(AuthError::RoleNotFound);
                }
                match u.roles.binary_search(&r.role) {
                    Ok(_) => bump = false,
                    Err(at) => {
                        u.roles.insert(at, r.role.clone());
                        put_user(w, u);
                    }
                }
            }
            AuthChange::UserRevokeRole(r) => {
                if next.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let u = next.users.get_mut(&r.name).ok_or(AuthError::UserNotFound)?;
                let at = u
                    .roles
                    .iter()
                    .position(|x| *x == r.role)
                    .ok_or(AuthError::RoleNotGranted)?;
                u.roles.remove(at);
                put_user(w, u);
            }
            AuthChange::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if next.roles.contains_key(&r.name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                let role = authpb::Role {
                    name: r.name.clone().into_bytes(),
                    key_permission: Vec::new(),
                };
                put_role(w, &role);
                next.roles.insert(r.name.clone(), role);
            }
            AuthChange::RoleDelete(r) => {
                if next.enabled && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                next.roles.remove(&r.role).ok_or(AuthError::RoleNotFound)?;
                w.delete_aux(ROLES, r.role.as_bytes());
                for u in next.users.values_mut() {
                    if let Some(at) = u.roles.iter().position(|x| *x == r.role) {
                        u.roles.remove(at);
                        put_user(w, u);
                    }
                }
            }
            AuthChange::RoleGrantPermission(r) => {
                let perm = r.perm.clone().ok_or(AuthError::PermissionNotGiven)?;
                let role = next.roles.get_mut(&r.name).ok_or(AuthError::RoleNotFound)?;
                match role
                    .key_permission
                    .iter_mut()
                    .find(|p| p.key == perm.key && p.range_end == perm.range_end)
                {
                    Some(p) => p.perm_type = perm.perm_type,
                    None => {
                        role.key_permission.push(perm);
                        role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
                    }
                }
                put_role(w, role);
            }
            AuthChange::RoleRevokePermission(r) => {
                let role = next.roles.get_mut(&r.role).ok_or(AuthError::RoleNotFound)?;
                let before = role.key_permission.len();
                role.key_permission
                    .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
                if role.key_permission.len() == before {
                    return Err(AuthError::PermissionNotGranted);
                }
                put_role(w, role);
            }
        }
        if bump {
            next.revision += 1;
            w.put_aux(META, REVISION_KEY, &next.revision.to_be_bytes());
        }
        *st = next;
        Ok(token)
    }

    /// Checks a client's write (or txn) at apply time, as etcd's auth applier does.
    /// `lease_keys`: the keys attached to a lease.
    pub fn check_command(
        &self,
        by: &Requester,
        cmd: &crate::apply::Command,
        lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
    ) -> Result<()> {
        use crate::apply::Command;
        let st = self.read();
        if !st.enabled {
            return Ok(());
        }
        let ok =
            |key: &[u8], end: &[u8], a: Access| st.permitted(by.user(), by.revision, key, end, a);
        match cmd {
            Command::Put(p) => check_put(&ok, p, lease_keys),
            Command::DeleteRange(d) => check_delete(&ok, d),
            Command::Txn(t) => check_txn(&ok, t, lease_keys),
            Command::LeaseRevoke(r) => {
                if st.admin(by.user()).is_ok() {
                    return Ok(());
                }
                lease_keys(r.id)
                    .iter()
                    .try_for_each(|k| ok(k, &[], Access::Write))
            }
            Command::Alarm(a) if a.action == pb::alarm_request::AlarmAction::Get as i32 => Ok(()),
            Command::Compact(_) | Command::Alarm(_) | Command::MemberUpdate(_) => {
                st.admin(by.user())
            }
            // Auth changes check their caller when applied; the rest carry no keys.
            _ => Ok(()),
        }
    }
}

type Check<'a> = dyn Fn(&[u8], &[u8], Access) -> Result<()> + 'a;

fn check_put(
    ok: &Check<'_>,
    p: &pb::PutRequest,
    lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
) -> Result<()> {
    ok(&p.key, &[], Access::Write)?;
    if p.lease != 0 {
        // A lease that holds keys this user may not write cannot take more of its keys:
        // the user could not revoke it.
        lease_keys(p.lease)
            .iter()
            .try_for_each(|k| ok(k, &[], Access::Write))?;
    }
    if p.prev_kv {
        ok(&p.key, &[], Access::Read)?;
    }
    Ok(())
}

fn check_delete(ok: &Check<'_>, d: &pb::DeleteRangeRequest) -> Result<()> {
    ok(&d.key, &d.range_end, Access::Write)?;
    if d.prev_kv {
        ok(&d.key, &d.range_end, Access::Read)?;
    }
    Ok(())
}

/// Every compare and every op of both branches, at every depth (etcd 3.4.23 skipped
/// nested txns and the `prev_kv` of txn puts).
fn check_txn(
    ok: &Check<'_>,
    t: &pb::TxnRequest,
    lease_keys: &dyn Fn(i64) -> Vec<Vec<u8>>,
) -> Result<()> {
    use pb::request_op::Request;
    for c in &t.compare {
        ok(&c.key, &c.range_end, Access::Read)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => ok(&r.key, &r.range_end, Access::Read)?,
            Some(Request::RequestPut(p)) => check_put(ok, p, lease_keys)?,
            Some(Request::RequestDeleteRange(d)) => check_delete(ok, d)?,
            Some(Request::RequestTxn(inner)) => check_txn(ok, inner, lease_keys)?,
            None => {}
        }
    }
    Ok(())
}

/// Whether a caller may read what a read-only request touches (Range, or a txn that
/// only reads): every range and compare, at every depth.
pub fn check_read_txn(store: &AuthStore, c: &Caller, t: &pb::TxnRequest) -> Result<()> {
    let st = store.read();
    if !st.enabled {
        return Ok(());
    }
    let ok = |key: &[u8], end: &[u8], a: Access| {
        st.permitted(c.user.as_deref(), c.revision, key, end, a)
    };
    check_txn(&ok, t, &|_| Vec::new())
}

fn put_user(w: &mut mvcc::Writer<'_>, u: &authpb::User) {
    w.put_aux(USERS, &u.name, &u.encode_to_vec());
}

fn put_role(w: &mut mvcc::Writer<'_>, r: &authpb::Role) {
    w.put_aux(ROLES, &r.name, &r.encode_to_vec());
}

/// A change of the auth store, as it travels through the log. Passwords are hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthChange {
    Enable,
    Disable,
    /// A password already checked at auth revision `revision` by the proposer.
    Authenticate {
        name: String,
        token_prefix: String,
        revision: u64,
    },
    /// `hashed_password` set, `password` empty.
    UserAdd(pb::AuthUserAddRequest),
    UserDelete(pb::AuthUserDeleteRequest),
    /// `hashed_password` set, `password` empty.
    UserChangePassword(pb::AuthUserChangePasswordRequest),
    UserGrantRole(pb::AuthUserGrantRoleRequest),
    UserRevokeRole(pb::AuthUserRevokeRoleRequest),
    RoleAdd(pb::AuthRoleAddRequest),
    RoleDelete(pb::AuthRoleDeleteRequest),
    RoleGrantPermission(pb::AuthRoleGrantPermissionRequest),
    RoleRevokePermission(pb::AuthRoleRevokePermissionRequest),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: authpb::permission::Type, key: &str, end: &str) -> authpb::Permission {
        authpb::Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        }
    }

    fn granted(perms: &[authpb::Permission]) -> Vec<Interval> {
        perms.iter().map(granted_interval).collect()
    }

    #[test]
    fn ranges_are_covered_by_the_union_of_grants_as_in_etcd() {
        use authpb::permission::Type::Read;
        let g = granted(&[
            perm(Read, "c", "e"),
            perm(Read, "e", "g"),
            perm(Read, "h", "j"),
        ]);
        assert!(covers(g.clone(), b"c", b"g"));
        assert!(covers(g.clone(), b"d", b"f"));
        assert!(covers(g.clone(), b"h", b"j"));
        assert!(!covers(g.clone(), b"c", b"h"), "gap [g,h)");
        assert!(covers(g.clone(), b"d", b""));
        assert!(!covers(g.clone(), b"g", b""));
        let mut g2 = g;
        g2.extend(granted(&[perm(Read, "g", "h")]));
        assert!(covers(g2, b"c", b"j"));

        // [a,z) plus the point z covers [a, z\0) but not z's successors.
        let g = granted(&[perm(Read, "a", "z"), perm(Read, "z", "")]);
        assert!(covers(g.clone(), b"z", b""));
        assert!(covers(g.clone(), b"a", b"z\0"));
        assert!(!covers(g.clone(), b"zz", b""));
        assert!(
            !covers(g.clone(), b"a", b"\0"),
            "from-key is checked as a range"
        );
        // From-key grants.
        let g = granted(&[perm(Read, "f", "\0")]);
        assert!(covers(g.clone(), b"f", b"z"));
        assert!(covers(g.clone(), b"g", b"\0"));
        assert!(!covers(g.clone(), b"a", b"\0"));
        assert!(!covers(g, b"e", b""));
        // Prefix grants.
        let g = granted(&[perm(Read, "/p/", "/p0")]);
        assert!(covers(g.clone(), b"/p/", b"/p0"));
        assert!(!covers(g.clone(), b"/p", b"/q"));
        assert!(!covers(g, b"/p/", b"/p1"));
        assert!(!covers(Vec::new(), b"a", b""));
    }

    #[test]
    fn access_types() {
        use authpb::permission::Type;
        assert!(Access::Read.granted_by(Type::Read as i32));
        assert!(!Access::Write.granted_by(Type::Read as i32));
        assert!(Access::Write.granted_by(Type::Readwrite as i32));
        assert!(!Access::Read.granted_by(Type::Write as i32));
        assert!(!Access::Read.granted_by(77));
    }
}
