//! What auth-service does, apart from how it is called: login, verify, refresh, logout,
//! sessions, revocation and the timeline; and the sensitive data that only auth-service
//! reads: encryptedData (decrypted with the user's session_keys), the user's phone number,
//! and the app's WeChat access_token. The gRPC layer (`grpc/`) only converts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use tracing::{error, info, warn};

use crate::cache::{
    Cache, CacheError, CodeClaim, MarkAsk, MarkRead, PhoneStamp, RateDecision, SessionMark,
};
use crate::config::{DatabaseSettings, Settings};
use crate::crypto::{CryptoError, Keys, TokenHash};
use crate::domain::{
    Device, EndReason, Invalid, Millis, Rate, SessionEvent, SessionInfo, SessionPolicy, Token,
    TokenKind, WechatCode, millis, now_millis,
};
use crate::error::{AuthError, WechatErr};
use crate::phones::KeptPhones;
use crate::store::{
    EXPIRE_BATCH, EndTarget, NewLogin, Owner, RotateOutcome, Rotation, Store, StoreError,
};
use crate::verified::{Known, UnmarkedEnds, Verified};
use crate::wechat::access_token::{AccessTokenError, AccessTokens, AppToken, RecentFailure};
use crate::wechat::crypto::EncryptedData;
use crate::wechat::{Code2Session, PhoneNumber, SessionKey, WechatCallError, WechatClient};

/// `last_active_at` moves at most this often.
const TOUCH_INTERVAL: Millis = 60_000;
/// How long a successfully exchanged code is remembered (WeChat's codes live 5 minutes).
const USED_CODE_TTL: Duration = Duration::from_secs(600);
/// How often a login waiting on another login's exchange of the same code looks again.
const CLAIM_POLL: Duration = Duration::from_millis(20);
/// How long a session's `Alive` mark lasts: after it, one `Verify` reads the database
/// again. Also the longest an end's mark is retried when the cache did not take it.
const ALIVE_FOR: Duration = Duration::from_secs(15);
/// How long an end's mark lasts: far longer than any `Verify` that read the database
/// before the end committed may still take to write its `Alive` mark.
const ENDED_FOR: Duration = Duration::from_secs(600);
/// How long a write of a phone number keeps its stamp at `writing`, past the exchange at
/// WeChat, if it cannot clear it (far above one database write; until then that user's
/// number is read from the database on every call).
const PHONE_WRITE_FOR: Duration = Duration::from_secs(300);
/// How many rows one statement of housekeeping changes at most: token rows purged, successor
/// pairs cleared, timeline events and ended sessions forgotten.
const HOUSEKEEPING_BATCH: u32 = 5_000;
/// How often an end's mark that the cache did not take is tried again.
const MARK_RETRY: Duration = Duration::from_secs(1);
/// How long this process refuses to answer from memory for a session it ended whose mark
/// the cache did not take: past the last `Alive` mark written before the end (`ALIVE_FOR`)
/// and one a `Verify` that read the database just before the end may still write (its
/// read bounded by the statement timeout, far below another `ALIVE_FOR`).
const UNMARKED_FOR: Millis = 2 * ALIVE_FOR.as_millis() as Millis;
/// The pauses before each retry of a phone number's write that failed for a moment (SQLite's
/// write turn busy, PostgreSQL unavailable): WeChat has answered and billed the number and
/// the code is spent, so a write that gave up at once would lose it. Four attempts over a
/// few seconds, in the call's task that runs to its end even if the caller went away.
const PHONE_WRITE_RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(e) => Self::Unavailable(e),
            StoreError::Other(e) => Self::Internal(e),
        }
    }
}

impl From<CacheError> for AuthError {
    fn from(e: CacheError) -> Self {
        Self::Unavailable(e.0)
    }
}

impl From<AccessTokenError> for AuthError {
    fn from(e: AccessTokenError) -> Self {
        match e {
            AccessTokenError::Wechat(e) => wechat_call_error(e),
            AccessTokenError::Store(e) => e.into(),
            AccessTokenError::Seal(e) => Self::internal(e),
            AccessTokenError::Recent(RecentFailure::Api(e)) => wechat_error(e),
            AccessTokenError::Recent(RecentFailure::Unreachable) => Self::WechatUnavailable,
            AccessTokenError::Recent(RecentFailure::Malformed) => Self::WechatError(None),
        }
    }
}

/// A new token pair with its expiries.
#[derive(Debug, Clone)]
pub struct IssuedPair {
    /// The access token.
    pub access: Token,
    /// When it expires.
    pub access_expires_at: Millis,
    /// The refresh token.
    pub refresh: Token,
    /// When it expires.
    pub refresh_expires_at: Millis,
}

/// What a login gives back.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    /// The new session's tokens.
    pub pair: IssuedPair,
    /// The user's openid.
    pub openid: String,
    /// The user's unionid.
    pub unionid: Option<String>,
    /// True when the user was created.
    pub is_new_user: bool,
    /// The new session.
    pub session_id: String,
}

/// A `Verify` begun by [`AuthCore::begin_verify`], for one item of a `VerifyBatch`.
#[derive(Debug)]
pub struct ReadAhead {
    /// The token's keyed hash.
    hash: TokenHash,
    /// When it was begun.
    now: Millis,
    /// What this process knew of the token, and what the cache said of its session.
    known: Option<(Arc<Known>, MarkRead)>,
}

impl ReadAhead {
    /// Whether this process knows the token: then its session's mark is read first
    /// ([`AuthCore::read_marks`]), and a live session is answered from memory.
    pub fn is_known(&self) -> bool {
        self.known.is_some()
    }
}

/// Who an access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid.
    pub unionid: Option<String>,
    /// The session.
    pub session_id: String,
    /// The access token's expiry.
    pub expires_at: Millis,
}

/// What a refresh gives back.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The new pair (the same one for a retry within the grace window).
    pub pair: IssuedPair,
    /// Whose session.
    pub owner: Owner,
}

/// A live session, with whether it is the caller's.
#[derive(Debug, Clone)]
pub struct ListedSession {
    /// The session.
    pub info: SessionInfo,
    /// True for the session of the token in the request.
    pub current: bool,
}

/// One page of a user's timeline.
#[derive(Debug, Clone)]
pub struct EventPage {
    /// Newest first.
    pub events: Vec<SessionEvent>,
    /// The id to pass as `before` for the next page, if there may be one.
    pub next_before: Option<i64>,
}

/// The successor pair as sealed for retries within the grace window.
#[derive(Serialize, Deserialize)]
struct SealedPair {
    a: String,
    ae: Millis,
    r: String,
    re: Millis,
}

/// The service's settings that shape behaviour.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Session policy.
    pub sessions: SessionPolicy,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
    /// Parallel-refresh grace window.
    pub refresh_grace: Duration,
    /// How long ended sessions and timeline events are kept.
    pub history_retention: Duration,
    /// Logins per client IP.
    pub login_rate: Rate,
    /// Phone-code exchanges per user.
    pub phone_rate: Rate,
    /// Rotations per session.
    pub refresh_rate: Rate,
    /// Time limit of one WeChat call.
    pub wechat_timeout: Duration,
    /// How many tokens `Verify` may answer from memory with the session's mark; 0 when
    /// marks would not reach every replica (PostgreSQL without Redis), or turned off.
    pub verify_cache: usize,
    /// How many users' phone numbers this process keeps in memory ([`KeptPhones`]); 0
    /// unless the store is SQLite, whose one replica is the only writer of the numbers.
    pub kept_phones: usize,
    /// Whether the kept numbers are checked against their stamps in the shared cache
    /// (PostgreSQL with Redis: other replicas write numbers too).
    pub phone_stamps: bool,
}

impl Policy {
    /// The policy part of the settings.
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            sessions: s.session_policy,
            access_ttl: s.access_ttl,
            refresh_ttl: s.refresh_ttl,
            refresh_grace: s.refresh_grace,
            history_retention: s.history_retention,
            login_rate: s.login_rate,
            phone_rate: s.phone_rate,
            refresh_rate: s.refresh_rate,
            wechat_timeout: s.wechat.timeout,
            // SQLite has one replica; with Redis, every replica sees every end's mark.
            // PostgreSQL alone: another replica's end would go unseen, so every Verify
            // reads the database.
            verify_cache: match (&s.database, &s.redis_url) {
                (DatabaseSettings::Sqlite { .. }, _) | (_, Some(_)) => s.verify_cache_size,
                (DatabaseSettings::Postgres { .. }, None) => 0,
            },
            // SQLite: this process writes every number. With Redis, each number's stamp
            // tells every replica when a copy is stale. PostgreSQL alone: no replica would
            // see another's write, so nothing is kept.
            kept_phones: match (&s.database, &s.redis_url) {
                (DatabaseSettings::Sqlite { .. }, _) | (_, Some(_)) => s.verify_cache_size,
                (DatabaseSettings::Postgres { .. }, None) => 0,
            },
            phone_stamps: matches!(s.database, DatabaseSettings::Postgres { .. })
                && s.redis_url.is_some(),
        }
    }
}

/// The auth core, shared by every call.
#[derive(Debug, Clone)]
pub struct AuthCore {
    store: Arc<dyn Store>,
    cache: Arc<dyn Cache>,
    wechat: WechatClient,
    keys: Arc<Keys>,
    policy: Policy,
    app_tokens: Arc<AccessTokens>,
    verified: Arc<Verified>,
    /// Sessions ended here whose `Ended` mark the cache did not take yet.
    unmarked: Arc<UnmarkedEnds>,
    phones: Arc<KeptPhones>,
}

impl AuthCore {
    /// Assembles the core from its parts.
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<dyn Cache>,
        wechat: WechatClient,
        keys: Arc<Keys>,
        policy: Policy,
    ) -> Self {
        let app_tokens = Arc::new(AccessTokens::new(
            store.clone(),
            wechat.clone(),
            keys.clone(),
        ));
        Self {
            verified: Arc::new(Verified::new(policy.verify_cache)),
            unmarked: Arc::new(UnmarkedEnds::default()),
            phones: Arc::new(KeptPhones::new(policy.kept_phones)),
            store,
            cache,
            wechat,
            keys,
            policy,
            app_tokens,
        }
    }

    /// The store (for readiness checks and the janitor).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Exchanges a wx.login code and opens a session.
    pub async fn login(
        &self,
        code: WechatCode,
        device: Device,
        client_ip: IpAddr,
    ) -> Result<LoggedIn, AuthError> {
        self.within_rate(
            &login_rate_key(client_ip),
            self.policy.login_rate,
            "too many logins from this address; retry later",
        )
        .await?;

        let code_key = self.keys.code_hash(code.as_ref());
        // Two attempts (one retry of -1), each under the WeChat timeout, and some slack.
        self.claim(
            &code_key,
            self.policy.wechat_timeout * 2 + Duration::from_secs(2),
        )
        .await?;
        let exchanged = self.exchange(&code).await;
        // Remember the outcome before anything else can fail: a code WeChat accepted is
        // spent, whatever happens to this login afterwards.
        self.cache
            .finish_code(&code_key, exchanged.is_ok(), USED_CODE_TTL)
            .await?;
        let session = exchanged?;
        self.open_session(session, device).await
    }

    /// Holds a code (login or phone, by its keyed hash) for this call, waiting while another
    /// call exchanges it; the claim lapses after `in_flight_ttl` if this call dies.
    async fn claim(&self, code_key: &str, in_flight_ttl: Duration) -> Result<(), AuthError> {
        let give_up = tokio::time::Instant::now() + in_flight_ttl + Duration::from_secs(1);
        loop {
            match self.cache.claim_code(code_key, in_flight_ttl).await? {
                CodeClaim::Acquired => return Ok(()),
                CodeClaim::Used => return Err(AuthError::CodeUsed),
                CodeClaim::InFlight if tokio::time::Instant::now() >= give_up => {
                    return Err(AuthError::WechatUnavailable);
                }
                CodeClaim::InFlight => tokio::time::sleep(CLAIM_POLL).await,
            }
        }
    }

    /// jscode2session, retrying WeChat's "busy" (-1) exactly once.
    async fn exchange(&self, code: &WechatCode) -> Result<Code2Session, AuthError> {
        let mut busy_once = false;
        loop {
            match self.wechat.code2session(code).await {
                Ok(answer) => return Ok(answer),
                Err(WechatCallError::Api(e)) if e.errcode == -1 && !busy_once => {
                    busy_once = true;
                    warn!(errcode = e.errcode, "WeChat is busy; retrying once");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(wechat_call_error(e)),
            }
        }
    }

    async fn open_session(&self, wx: Code2Session, device: Device) -> Result<LoggedIn, AuthError> {
        let now = now_millis();
        let pair = self.new_pair(now)?;
        let session_id = uuid::Uuid::new_v4().to_string();
        let sealed = self
            .keys
            .seal(wx.session_key.expose(), wx.openid.as_bytes())
            .map_err(AuthError::internal)?;
        let outcome = self
            .store
            .login(NewLogin {
                openid: wx.openid.clone(),
                unionid: wx.unionid.clone(),
                session_key_sealed: sealed,
                session_key_fp: self.keys.fingerprint(wx.session_key.expose()),
                session_id: session_id.clone(),
                device,
                access: (self.keys.token_hash(&pair.access), pair.access_expires_at),
                refresh: (self.keys.token_hash(&pair.refresh), pair.refresh_expires_at),
                policy: self.policy.sessions,
                now,
            })
            .await?;
        self.ended_now(outcome.replaced.clone()).await;
        info!(
            openid = %wx.openid,
            session_id = %session_id,
            is_new_user = outcome.is_new_user,
            replaced_sessions = outcome.replaced.len(),
            "login"
        );
        Ok(LoggedIn {
            pair,
            openid: wx.openid,
            unionid: outcome.unionid,
            is_new_user: outcome.is_new_user,
            session_id,
        })
    }

    fn new_pair(&self, now: Millis) -> Result<IssuedPair, AuthError> {
        Ok(IssuedPair {
            access: Token::generate(TokenKind::Access).map_err(AuthError::internal)?,
            access_expires_at: now.saturating_add(millis(self.policy.access_ttl)),
            refresh: Token::generate(TokenKind::Refresh).map_err(AuthError::internal)?,
            refresh_expires_at: now.saturating_add(millis(self.policy.refresh_ttl)),
        })
    }

    /// The identity behind an access token; every end of a session counts at once.
    pub async fn verify(&self, raw: &str) -> Result<Identity, AuthError> {
        self.verify_and_stamp(raw, false, None)
            .await
            .map(|(id, _)| id)
    }

    /// Whether [`Self::read_marks`] saves anything: with a networked cache (Redis), a round
    /// trip per item known in memory.
    pub fn reads_ahead(&self) -> bool {
        self.cache.reads_marks_at_once()
    }

    /// Begins the `Verify` of a `VerifyBatch` item's token: its keyed hash, and what this
    /// process knows of it; `None` when the token does not parse (its
    /// [`Self::verify_as_asked`] tells why). A token it knows ([`ReadAhead::is_known`])
    /// waits for [`Self::read_marks`]; any other goes to the database at once.
    pub fn begin_verify(&self, raw: &str) -> Option<ReadAhead> {
        let token = Token::parse(TokenKind::Access, raw)?;
        let hash = self.keys.token_hash(&token);
        let now = now_millis();
        let known = self.verified.get(&hash, now);
        Some(ReadAhead {
            hash,
            now,
            known: known.map(|k| (k, (None, None))),
        })
    }

    /// Reads the marks of the sessions of the `Verify`s begun (each with whether its item
    /// asks for the phone number, whose stamp is then read too) in one cache round trip,
    /// where each `Verify` alone would make its own. A mark read here is as fresh as one
    /// its item would read: the items' call has arrived, and they run after this.
    pub async fn read_marks(&self, begun: &mut [(ReadAhead, bool)]) {
        let asks: Vec<MarkAsk<'_>> = begun
            .iter()
            .filter_map(|(a, phone)| {
                let (known, _) = a.known.as_ref()?;
                Some(MarkAsk {
                    session_id: &known.session_id,
                    phone_of: (*phone && self.policy.phone_stamps).then_some(known.openid.as_str()),
                })
            })
            .collect();
        if asks.is_empty() {
            return;
        }
        // A cache that fails reads as no marks: each item's database answers.
        let Ok(read) = self.cache.session_marks(&asks).await else {
            return;
        };
        drop(asks);
        let known = begun.iter_mut().filter_map(|(a, _)| a.known.as_mut());
        for ((_, slot), read) in known.zip(read) {
            *slot = read;
        }
    }

    /// A `Verify` as asked: the identity, and with `include_phone` the user's kept phone
    /// number (`None` when none is kept); with `ahead`, begun by [`Self::begin_verify`].
    pub async fn verify_as_asked(
        &self,
        raw: &str,
        include_phone: bool,
        ahead: Option<ReadAhead>,
    ) -> Result<(Identity, Option<PhoneNumber>), AuthError> {
        let (id, stamp) = self.verify_and_stamp(raw, include_phone, ahead).await?;
        let phone = if include_phone {
            self.kept_phone(&id.openid, stamp).await?
        } else {
            None
        };
        Ok((id, phone))
    }

    /// [`Self::verify`], and with `phone_stamp` the stamp of the user's phone number when
    /// the session's mark was read (in the same round trip); with `ahead`, the token's hash
    /// and its session's mark as [`Self::begin_verify`] and [`Self::read_marks`] found
    /// them.
    async fn verify_and_stamp(
        &self,
        raw: &str,
        phone_stamp: bool,
        ahead: Option<ReadAhead>,
    ) -> Result<(Identity, Option<PhoneStamp>), AuthError> {
        let (hash, now, known) = match ahead {
            Some(ahead) => (ahead.hash, ahead.now, ahead.known),
            None => {
                if raw.is_empty() {
                    return Err(AuthError::TokenMissing);
                }
                let token = Token::parse(TokenKind::Access, raw).ok_or(AuthError::TokenInvalid)?;
                let hash = self.keys.token_hash(&token);
                let now = now_millis();
                let known = match self.verified.get(&hash, now) {
                    Some(known) => {
                        let read = self.read_mark(&known, phone_stamp).await;
                        Some((known, read))
                    }
                    None => None,
                };
                (hash, now, known)
            }
        };
        let mut stamp = None;
        if let Some((known, (mark, read_stamp))) = known {
            stamp = read_stamp;
            if mark == Some(SessionMark::Alive) && !self.unmarked.holds(&known.session_id, now) {
                self.touch(&known, now);
                return Ok((identity(&known), stamp));
            }
        }

        let record = self
            .store
            .find_access(&hash)
            .await?
            .ok_or(AuthError::TokenInvalid)?;
        if let Some(reason) = record.ended {
            return Err(ended(reason));
        }
        if record.expires_at <= now || record.refresh_expires_at <= now {
            return Err(AuthError::TokenExpired);
        }
        let known = self
            .verified
            .put(&hash, &record, now, record.last_active_at);
        self.touch(&known, now);
        if !self.verified.is_off() {
            // After the read: an end committed since has marked the session `Ended`, and
            // this `Alive` is then refused (it never replaces a mark).
            if let Err(e) = self.cache.mark_alive(&record.session_id, ALIVE_FOR).await {
                warn!(error = %e, "could not mark a session alive");
            }
        }
        Ok((identity(&known), stamp))
    }

    /// The mark of a known token's session and, with `phone_stamp` (and stamps in use), the
    /// stamp of its user's phone number, in one round trip. A cache that fails reads as no
    /// mark: the database answers.
    async fn read_mark(&self, known: &Known, phone_stamp: bool) -> MarkRead {
        if phone_stamp && self.policy.phone_stamps {
            self.cache
                .session_mark_and_phone_stamp(&known.session_id, &known.openid)
                .await
                .map_or((None, None), |(mark, stamp)| (mark, Some(stamp)))
        } else {
            (
                self.cache
                    .session_mark(&known.session_id)
                    .await
                    .ok()
                    .flatten(),
                None,
            )
        }
    }

    /// Moves `last_active_at`, at most once a minute, off the request's path (a slow write
    /// must not slow `Verify` down).
    fn touch(&self, known: &Known, now: Millis) {
        if !known.claim_touch(now, TOUCH_INTERVAL) {
            return;
        }
        let store = self.store.clone();
        let session_id = known.session_id.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch(&session_id, now, TOUCH_INTERVAL).await {
                warn!(error = %e, "could not record session activity");
            }
        });
    }

    /// Tells the cache that sessions just ended (their end is committed), so no replica
    /// answers `Verify` for them from memory. A cache that does not take the marks is
    /// tried again in the background for as long as an `Alive` mark can live, and until it
    /// takes them this process answers those sessions' tokens from the database only (its
    /// next mark read may find the old `Alive` mark). Written even when this process keeps
    /// no `Verify` memory itself: other replicas on a shared cache may, and would otherwise
    /// go on reading their `Alive` marks.
    async fn ended_now(&self, session_ids: Vec<String>) {
        if session_ids.is_empty() {
            return;
        }
        let Err(e) = self.cache.mark_ended(&session_ids, ENDED_FOR).await else {
            return;
        };
        warn!(
            error = %e,
            sessions = session_ids.len(),
            "could not mark ended sessions in the cache; retrying"
        );
        let now = now_millis();
        self.unmarked
            .add(&session_ids, now, now.saturating_add(UNMARKED_FOR));
        let cache = self.cache.clone();
        let unmarked = self.unmarked.clone();
        // Among the work a stopping process waits for, within its grace.
        shared::telemetry::spawn_detached(async move {
            let give_up = tokio::time::Instant::now() + ALIVE_FOR;
            while tokio::time::Instant::now() < give_up {
                tokio::time::sleep(MARK_RETRY).await;
                if cache.mark_ended(&session_ids, ENDED_FOR).await.is_ok() {
                    unmarked.remove(&session_ids);
                    info!(
                        sessions = session_ids.len(),
                        "ended sessions marked in the cache"
                    );
                    return;
                }
            }
        });
    }

    /// Exchanges a refresh token for the next pair.
    pub async fn refresh(&self, raw: &str) -> Result<Refreshed, AuthError> {
        if raw.is_empty() {
            return Err(AuthError::TokenMissing);
        }
        let old = Token::parse(TokenKind::Refresh, raw).ok_or(AuthError::TokenInvalid)?;
        let old_hash = self.keys.token_hash(&old);
        // Each rotation writes two token rows and an event, kept for weeks: a session's are
        // counted, so that no client (buggy or not) grows the database at request rate. A
        // token rotated already writes nothing new (its successor, or reuse), and one that
        // expired or of an ended session is refused by the rotation below as before: none
        // of them counts. An unknown one is refused here, without the rotation's write turn
        // (on SQLite): a token is known from the commit that made it, before any client had
        // it.
        match self.store.refresh_session(&old_hash, now_millis()).await? {
            None => return Err(AuthError::TokenInvalid),
            Some((session_id, true)) => {
                self.within_rate(
                    &refresh_rate_key(&session_id),
                    self.policy.refresh_rate,
                    "too many refreshes of this session; retry later",
                )
                .await?;
            }
            Some((_, false)) => {}
        }
        let now = now_millis();
        let pair = self.new_pair(now)?;
        let sealed = serde_json::to_vec(&SealedPair {
            a: pair.access.expose().to_owned(),
            ae: pair.access_expires_at,
            r: pair.refresh.expose().to_owned(),
            re: pair.refresh_expires_at,
        })
        .map_err(AuthError::internal)?;
        let successor = self
            .keys
            .seal_for_token(&old, &sealed)
            .map_err(AuthError::internal)?;
        let outcome = self
            .store
            .rotate(Rotation {
                old: old_hash,
                access: (self.keys.token_hash(&pair.access), pair.access_expires_at),
                refresh: (self.keys.token_hash(&pair.refresh), pair.refresh_expires_at),
                successor,
                now,
            })
            .await?;
        match outcome {
            RotateOutcome::Rotated(owner) => Ok(Refreshed { pair, owner }),
            RotateOutcome::AlreadyRotated {
                owner,
                rotated_at,
                successor,
            } => {
                let within_grace =
                    now.saturating_sub(rotated_at) <= millis(self.policy.refresh_grace);
                if let (true, Some(sealed)) = (within_grace, successor) {
                    let pair = self.open_successor(&old, &sealed)?;
                    return Ok(Refreshed { pair, owner });
                }
                let ended = self
                    .store
                    .end_sessions(
                        EndTarget::Session(&owner.session_id),
                        EndReason::RefreshReused,
                        now,
                    )
                    .await?;
                let revoked = ended.len();
                self.ended_now(ended).await;
                warn!(
                    openid = %owner.openid,
                    session_id = %owner.session_id,
                    revoked,
                    "a rotated refresh token was presented again after the grace window; session revoked"
                );
                Err(AuthError::RefreshTokenReused)
            }
            RotateOutcome::Ended(EndReason::RefreshReused) => Err(AuthError::RefreshTokenReused),
            RotateOutcome::Ended(reason) => Err(ended(reason)),
            RotateOutcome::Expired => Err(AuthError::TokenExpired),
            RotateOutcome::NotFound => Err(AuthError::TokenInvalid),
        }
    }

    fn open_successor(&self, old: &Token, sealed: &[u8]) -> Result<IssuedPair, AuthError> {
        let plain = self
            .keys
            .open_for_token(old, sealed)
            .map_err(AuthError::internal)?;
        let p: SealedPair = serde_json::from_slice(&plain).map_err(unreadable)?;
        let token = |kind, raw: &str| {
            Token::parse(kind, raw)
                .ok_or_else(|| AuthError::internal(anyhow::anyhow!("bad sealed pair")))
        };
        Ok(IssuedPair {
            access: token(TokenKind::Access, &p.a)?,
            access_expires_at: p.ae,
            refresh: token(TokenKind::Refresh, &p.r)?,
            refresh_expires_at: p.re,
        })
    }

    /// Ends the token's session, or every session of its user.
    pub async fn logout(&self, raw: &str, all: bool) -> Result<u32, AuthError> {
        let id = match self.verify(raw).await {
            // Its own session only: an expired token (of any earlier pair, kept a day) is
            // not enough to end every session of the user.
            Err(AuthError::TokenExpired) if !all => self.expired_of_a_live_session(raw).await?,
            verified => verified?,
        };
        let (target, reason) = if all {
            (EndTarget::User(&id.openid), EndReason::LogoutAll)
        } else {
            (EndTarget::Session(&id.session_id), EndReason::Logout)
        };
        let ended = self
            .store
            .end_sessions(target, reason, now_millis())
            .await?;
        let n = count(&ended);
        self.ended_now(ended).await;
        info!(openid = %id.openid, session_id = %id.session_id, all, revoked = n, "logout");
        Ok(n)
    }

    /// Counts one event in `key`'s window of `rate` (shared through the cache);
    /// `RATE_LIMITED`, saying `what`, once the window is full.
    async fn within_rate(
        &self,
        key: &str,
        rate: Rate,
        what: &'static str,
    ) -> Result<(), AuthError> {
        match self.cache.hit(key, rate.count, rate.window).await? {
            RateDecision::Allowed => Ok(()),
            RateDecision::Limited { retry_after } => {
                Err(AuthError::RateLimited { retry_after, what })
            }
        }
    }

    /// The identity behind an access token that expired while its session lives on (its
    /// refresh token still works): enough to log that one session out, since a client whose
    /// access token lapsed would otherwise have to refresh first, and one that cannot (its
    /// refresh token lost) could not end the session at all. Any other token answers as
    /// `Verify` does. Expired tokens are kept a day ([`Self::housekeeping`]).
    async fn expired_of_a_live_session(&self, raw: &str) -> Result<Identity, AuthError> {
        let token = Token::parse(TokenKind::Access, raw).ok_or(AuthError::TokenInvalid)?;
        let record = self
            .store
            .find_access(&self.keys.token_hash(&token))
            .await?
            .ok_or(AuthError::TokenInvalid)?;
        if let Some(reason) = record.ended {
            return Err(ended(reason));
        }
        if record.refresh_expires_at <= now_millis() {
            return Err(AuthError::TokenExpired);
        }
        Ok(Identity {
            openid: record.openid,
            unionid: record.unionid,
            session_id: record.session_id,
            expires_at: record.expires_at,
        })
    }

    /// The live sessions of the token's user.
    pub async fn list_sessions(&self, raw: &str) -> Result<Vec<ListedSession>, AuthError> {
        let id = self.verify(raw).await?;
        let sessions = self.store.list_sessions(&id.openid, now_millis()).await?;
        Ok(sessions
            .into_iter()
            .map(|info| ListedSession {
                current: info.id == id.session_id,
                info,
            })
            .collect())
    }

    /// Ends every session of a user (operators).
    pub async fn revoke_user(&self, openid: &str) -> Result<u32, AuthError> {
        check_openid(openid)?;
        if !self.store.user_exists(openid).await? {
            return Err(AuthError::UserNotFound);
        }
        let ended = self
            .store
            .end_sessions(
                EndTarget::User(openid),
                EndReason::RevokedByOperator,
                now_millis(),
            )
            .await?;
        let n = count(&ended);
        self.ended_now(ended).await;
        warn!(openid = %openid, revoked = n, "user revoked by an operator");
        Ok(n)
    }

    /// A page of a user's session timeline.
    pub async fn list_events(
        &self,
        openid: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<EventPage, AuthError> {
        check_openid(openid)?;
        let limit = match page_size {
            0 => 100,
            1..=500 => page_size,
            _ => {
                return Err(AuthError::InvalidArgument(Invalid::new(
                    "page_size",
                    "must be from 1 to 500",
                )));
            }
        };
        let before = match page_token {
            "" => None,
            t => Some(t.parse::<i64>().map_err(|_| {
                AuthError::InvalidArgument(Invalid::new(
                    "page_token",
                    "is not a page token of this API",
                ))
            })?),
        };
        if !self.store.user_exists(openid).await? {
            return Err(AuthError::UserNotFound);
        }
        // Sessions that ran out since anyone looked get their `expired` end recorded first.
        self.store
            .expire_sessions(Some(openid), now_millis())
            .await?;
        let events = self.store.list_events(openid, before, limit).await?;
        let next_before = (events.len() == limit as usize)
            .then(|| events.last().map(|e| e.id))
            .flatten();
        Ok(EventPage {
            events,
            next_before,
        })
    }

    /// Decrypts encryptedData with the token's user's newest session_key, then the previous
    /// one, and answers the plaintext JSON once its watermark names this app.
    pub async fn decrypt_data(
        &self,
        raw_token: &str,
        encrypted_data: &str,
        iv: &str,
    ) -> Result<String, AuthError> {
        let id = self.verify(raw_token).await?;
        let data =
            EncryptedData::parse(encrypted_data, iv).map_err(AuthError::InvalidEncryptedData)?;
        let keys = self.session_keys(&id.openid).await?;
        let decrypted = data.decrypt(&keys, self.wechat.appid());
        match &decrypted {
            Ok(_) => info!(openid = %id.openid, "encrypted data decrypted"),
            Err(e) => info!(openid = %id.openid, outcome = e.reason(), "encrypted data refused"),
        }
        decrypted
    }

    /// The user's session_keys, newest first, opened. One that cannot be opened (sealed under
    /// another `AUTH_TOKEN_KEY`) is left out: data it encrypted answers SESSION_KEY_STALE.
    async fn session_keys(&self, openid: &str) -> Result<Vec<SessionKey>, AuthError> {
        let Some(sealed) = self.store.session_keys(openid).await? else {
            return Ok(Vec::new());
        };
        let mut keys = Vec::with_capacity(2);
        for s in std::iter::once(&sealed.newest).chain(sealed.previous.as_ref()) {
            match self
                .keys
                .open(s, openid.as_bytes())
                .ok()
                .and_then(|plain| SessionKey::from_bytes(&plain))
            {
                Some(key) => keys.push(key),
                None => warn!(
                    openid = %openid,
                    "a stored session_key cannot be opened (was AUTH_TOKEN_KEY changed?)"
                ),
            }
        }
        Ok(keys)
    }

    /// Exchanges a getPhoneNumber code at WeChat, once ever, and keeps the number with the
    /// token's user; with an empty code, answers the number kept.
    pub async fn phone_number(
        &self,
        raw_token: &str,
        code: &str,
    ) -> Result<PhoneNumber, AuthError> {
        let id = self.verify(raw_token).await?;
        if code.is_empty() {
            return self
                .kept_phone(&id.openid, None)
                .await?
                .ok_or(AuthError::PhoneNotSet);
        }
        let code = WechatCode::parse(code).map_err(AuthError::InvalidCode)?;
        // Each exchange may be a billed WeChat call, whatever the code turns out to be: a
        // user's are counted (a retry of a spent code too), across replicas with Redis.
        self.within_rate(
            &phone_rate_key(&id.openid),
            self.policy.phone_rate,
            "too many phone numbers asked for by this user; retry later",
        )
        .await?;
        // Up to eight WeChat calls (stable_token and the exchange, each with a retry of -1,
        // then both again after a refused token), each under the WeChat timeout.
        let exchange_for = self.policy.wechat_timeout * 8 + Duration::from_secs(2);
        // Every replica's kept copy of the number stops counting before anything starts
        // (see KeptPhones); a cache that cannot be told refuses the call before any billed
        // exchange. If the end below is never reached, `writing` lapses by itself.
        if !self.policy.phone_stamps {
            return self.exchange_and_store(&id, &code, exchange_for).await;
        }
        self.cache
            .phone_write_started(&id.openid, exchange_for + PHONE_WRITE_FOR)
            .await?;
        let stored = self.exchange_and_store(&id, &code, exchange_for).await;
        if let Err(e) = self.cache.phone_write_ended(&id.openid).await {
            warn!(error = %e, "could not clear a phone number's stamp (it lapses by itself)");
        }
        stored
    }

    /// The exchange of a phone code for `id`'s user, and the number stored.
    async fn exchange_and_store(
        &self,
        id: &Identity,
        code: &WechatCode,
        exchange_for: Duration,
    ) -> Result<PhoneNumber, AuthError> {
        // Namespaced apart from login codes, claimed exactly like them: across replicas
        // through the shared cache, so a retry or a race never makes a second (billed) call.
        let code_key = self.keys.code_hash(&format!("phone:{}", code.as_ref()));
        self.claim(&code_key, exchange_for).await?;
        let exchanged = self.exchange_phone_code(code, &id.openid).await;
        // Remembered before anything else can fail: WeChat bills a code it accepted.
        self.cache
            .finish_code(&code_key, exchanged.is_ok(), USED_CODE_TTL)
            .await?;
        let phone = exchanged?;
        self.store_phone(&id.openid, &phone).await?;
        Ok(phone)
    }

    /// Keeps `phone` (just answered, and billed, by WeChat) with the user, sealed; a write
    /// that fails for a moment is tried again ([`PHONE_WRITE_RETRIES`]).
    async fn store_phone(&self, openid: &str, phone: &PhoneNumber) -> Result<(), AuthError> {
        let plain = serde_json::to_vec(phone).map_err(AuthError::internal)?;
        let sealed = self
            .keys
            .seal(&plain, &phone_context(openid))
            .map_err(AuthError::internal)?;
        let write = self.phones.write_started(openid);
        let mut pauses = PHONE_WRITE_RETRIES.iter();
        let stored = loop {
            match self.store.set_phone(openid, &sealed, now_millis()).await {
                Err(StoreError::Unavailable(e)) if let Some(pause) = pauses.next() => {
                    warn!(
                        openid = %openid,
                        error = %e,
                        retry_in = ?pause,
                        "could not store a phone number; retrying"
                    );
                    tokio::time::sleep(*pause).await;
                }
                stored => break stored,
            }
        };
        drop(write);
        let stored = stored.inspect_err(|e| {
            error!(
                openid = %openid,
                error = %e,
                "a phone number WeChat answered (and billed) could not be stored: the user must \
                 bind it again with a new code"
            );
        });
        if !stored? {
            return Err(AuthError::internal(anyhow::anyhow!(
                "the user of a verified token is not in the store"
            )));
        }
        info!(openid = %openid, "phone number stored");
        Ok(())
    }

    /// The user's kept phone number, `None` when none is kept: from memory when this
    /// process keeps numbers ([`KeptPhones`]) and `stamp` (read now, or else asked for
    /// here) says its copy is current, otherwise from the database.
    async fn kept_phone(
        &self,
        openid: &str,
        stamp: Option<PhoneStamp>,
    ) -> Result<Option<PhoneNumber>, AuthError> {
        if self.phones.is_off() {
            return self.stored_phone(openid).await;
        }
        let stamp = match stamp {
            // One process writes every number (SQLite): its own rule suffices.
            _ if !self.policy.phone_stamps => PhoneStamp::Local,
            Some(stamp) => stamp,
            // A cache that fails (FallbackCache answers `Unusable`) leaves the database.
            None => self
                .cache
                .phone_stamp(openid)
                .await
                .unwrap_or(PhoneStamp::Unusable),
        };
        if let Some(phone) = self.phones.get(openid, &stamp) {
            return Ok(phone);
        }
        // The stamp the read is kept under, taken before the read.
        let keep_under = match stamp {
            PhoneStamp::Local => Some(None),
            PhoneStamp::Current(s) => Some(Some(s)),
            PhoneStamp::Missing => self
                .cache
                .new_phone_stamp(openid)
                .await
                .ok()
                .flatten()
                .map(Some),
            PhoneStamp::Unusable => None,
        };
        let read = self.phones.read_started();
        let phone = self.stored_phone(openid).await?;
        if let Some(stamp) = keep_under {
            self.phones.read_done(read, openid, stamp, &phone);
        }
        Ok(phone)
    }

    /// The user's phone number as the database has it.
    async fn stored_phone(&self, openid: &str) -> Result<Option<PhoneNumber>, AuthError> {
        let phone = match self.store.phone(openid).await? {
            None => None,
            Some(sealed) => match open_phone(&self.keys, &sealed, openid) {
                Ok(plain) => Some(serde_json::from_slice(&plain).map_err(unreadable)?),
                // Sealed under an AUTH_TOKEN_KEY that has since changed: unreadable, as the
                // sessions of that time are. The user has no number until one is bound
                // again, where an error would fail every `GET /v1/me` of theirs.
                Err(_) => {
                    warn!(
                        "a stored phone number does not open with this AUTH_TOKEN_KEY (it \
                         changed since): answered as none until the user binds one again"
                    );
                    None
                }
            },
        };
        Ok(phone)
    }

    /// getuserphonenumber: WeChat's "busy" (-1) retried once; an access_token WeChat
    /// refuses (40001/42001) renewed once (forced only if no one renewed it already) and
    /// the exchange tried once more.
    async fn exchange_phone_code(
        &self,
        code: &WechatCode,
        openid: &str,
    ) -> Result<PhoneNumber, AuthError> {
        let mut token = self.app_tokens.current().await?;
        let mut busy_once = false;
        let mut renewed_once = false;
        loop {
            match self.wechat.phone_number(token.secret(), code, openid).await {
                Ok(phone) => return Ok(phone),
                Err(WechatCallError::Api(e)) if e.errcode == -1 && !busy_once => {
                    busy_once = true;
                    warn!(errcode = e.errcode, "WeChat is busy; retrying once");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(WechatCallError::Api(e))
                    if matches!(e.errcode, 40001 | 42001) && !renewed_once =>
                {
                    renewed_once = true;
                    warn!(
                        errcode = e.errcode,
                        generation = token.generation(),
                        "getuserphonenumber refused the app's access_token"
                    );
                    token = self.app_tokens.invalidated(&token).await?;
                }
                Err(e) => return Err(wechat_call_error(e)),
            }
        }
    }

    /// The app's current WeChat access_token (renewed first when less than 5 minutes are
    /// left), for internal clients; when WeChat `refused` the current one (40001/42001), a
    /// forced refresh's. A refused token that is no longer (or never was) the current one
    /// changes nothing.
    pub async fn wechat_access_token(&self, refused: Option<&str>) -> Result<AppToken, AuthError> {
        let current = self.app_tokens.current_for_callers().await?;
        let Some(refused) = refused else {
            return Ok(current);
        };
        let is_current: bool = current
            .secret()
            .expose_secret()
            .as_bytes()
            .ct_eq(refused.as_bytes())
            .into();
        if !is_current {
            return Ok(current);
        }
        Ok(self.app_tokens.invalidated(&current).await?)
    }

    /// Periodic housekeeping: expired sessions recorded, dead token rows deleted, successor
    /// pairs cleared a margin after the grace window (`store::SUCCESSOR_MARGIN`: never one a
    /// refresh within the window by its own clock may still be owed), ended sessions and
    /// timeline events past `AUTH_HISTORY_RETENTION` deleted, cache swept.
    pub async fn housekeeping(&self) -> Result<(), AuthError> {
        let now = now_millis();
        self.cache.sweep().await;
        // Each runs whatever the others did: a failing expiry must not stop dead rows from
        // being deleted, nor the other way round.
        let (expired, expiry) = self.expire_due_sessions(now).await;
        // Expired tokens are kept a day so that they answer TOKEN_EXPIRED, not TOKEN_INVALID.
        let purged = self
            .store
            .purge(
                now,
                86_400_000,
                millis(self.policy.refresh_grace),
                HOUSEKEEPING_BATCH,
            )
            .await;
        let ((events, sessions), forgotten) = self.forget_history(now).await;
        if events > 0 || sessions > 0 {
            info!(
                forgotten_events = events,
                forgotten_sessions = sessions,
                "housekeeping forgot history past retention"
            );
        }
        // Counts of what was committed, also when a later batch then failed.
        let purged_n = purged.as_ref().map_or(0, |n| *n);
        if expired > 0 || purged_n > 0 {
            info!(expired, purged = purged_n, "housekeeping");
        }
        expiry?;
        purged?;
        forgotten?;
        Ok(())
    }

    /// Ends every session whose refresh token expired, [`EXPIRE_BATCH`] a transaction: one
    /// batch every 5 minutes would end at most 288,000 a day, fewer than a large app's
    /// sessions may expire. Returns how many were ended, also when a batch then failed (the
    /// batches before it are committed).
    async fn expire_due_sessions(&self, now: Millis) -> (u32, Result<(), StoreError>) {
        let mut expired = 0;
        loop {
            let n = match self.store.expire_sessions(None, now).await {
                Ok(n) => n,
                Err(e) => return (expired, Err(e)),
            };
            expired += n;
            if n < EXPIRE_BATCH {
                return (expired, Ok(()));
            }
        }
    }

    /// Deletes the timeline events and ended sessions older than `AUTH_HISTORY_RETENTION`,
    /// a batch of each at a time (a short statement or write turn each, however much is
    /// due after a long stop); returns how many of each were deleted, also when a batch then
    /// failed: the batches before it are committed, and their counts are logged all the same.
    async fn forget_history(&self, now: Millis) -> ((u64, u64), Result<(), StoreError>) {
        let before = now.saturating_sub(millis(self.policy.history_retention));
        let (mut events, mut sessions) = (0, 0);
        loop {
            let (e, s) = match self.store.forget(before, HOUSEKEEPING_BATCH).await {
                Ok(counts) => counts,
                Err(err) => return ((events, sessions), Err(err)),
            };
            events += e;
            sessions += s;
            if e < u64::from(HOUSEKEEPING_BATCH) && s < u64::from(HOUSEKEEPING_BATCH) {
                return ((events, sessions), Ok(()));
            }
        }
    }
}

/// The window a session's rotations count in (`AUTH_REFRESH_RATE`).
fn refresh_rate_key(session_id: &str) -> String {
    format!("refresh-session:{session_id}")
}

/// The window a user's phone-code exchanges count in (`AUTH_PHONE_RATE`).
fn phone_rate_key(openid: &str) -> String {
    format!("phone-user:{openid}")
}

/// The login-rate window a client address counts in: an IPv4 address (also when written as
/// IPv4-mapped IPv6) on its own, an IPv6 address by its /64, the block one subscriber line
/// or host is given, so that walking the addresses of one's own /64 does not escape the
/// limit (and does not make a window per address).
fn login_rate_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("login-ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("login-ip:{v4}"),
            None => {
                let net = u128::from(v6) & !(u128::MAX >> 64);
                format!("login-ip:{}/64", std::net::Ipv6Addr::from(net))
            }
        },
    }
}

fn check_openid(openid: &str) -> Result<(), AuthError> {
    if openid.is_empty() || openid.len() > 128 || openid.chars().any(char::is_control) {
        return Err(AuthError::InvalidArgument(Invalid::new(
            "openid",
            "must be 1 to 128 characters",
        )));
    }
    Ok(())
}

/// The identity `Verify` answers, from the token's facts.
fn identity(known: &Known) -> Identity {
    Identity {
        openid: known.openid.clone(),
        unionid: known.unionid.clone(),
        session_id: known.session_id.clone(),
        expires_at: known.expires_at,
    }
}

/// How many sessions ended, for an answer.
fn count(ended: &[String]) -> u32 {
    u32::try_from(ended.len()).unwrap_or(u32::MAX)
}

/// The error a token of an ended session gets.
fn ended(reason: EndReason) -> AuthError {
    match reason {
        EndReason::Replaced => AuthError::SessionReplaced,
        EndReason::Expired => AuthError::TokenExpired,
        EndReason::Logout
        | EndReason::LogoutAll
        | EndReason::RefreshReused
        | EndReason::RevokedByOperator => AuthError::TokenRevoked,
    }
}

/// A failed WeChat call to our error: WeChat's own errors by errcode, the rest as
/// unreachable or unreadable.
fn wechat_call_error(e: WechatCallError) -> AuthError {
    match e {
        WechatCallError::Api(e) => wechat_error(e),
        WechatCallError::Unreachable(e) => {
            warn!(error = %e, "WeChat unreachable or too slow");
            AuthError::WechatUnavailable
        }
        e @ WechatCallError::Malformed(_) => {
            error!(error = %e, "unreadable answer from WeChat");
            AuthError::WechatError(None)
        }
    }
}

/// WeChat's errcode to our error (CONTRACT.md, Login errors).
fn wechat_error(e: WechatErr) -> AuthError {
    match e.errcode {
        40029 => AuthError::WechatInvalidCode(e),
        40163 => AuthError::WechatCodeUsed(e),
        45011 => AuthError::WechatRateLimited(e),
        40226 => AuthError::WechatRiskyUser(e),
        -1 => AuthError::WechatBusy(e),
        40013 | 40125 | 40164 => {
            error!(
                errcode = e.errcode,
                errmsg = %e.errmsg,
                "WeChat refuses our credentials or our IP (check WECHAT_APPID, WECHAT_SECRET and the API IP whitelist)"
            );
            AuthError::WechatError(Some(e))
        }
        _ => {
            warn!(errcode = e.errcode, errmsg = %e.errmsg, "WeChat error");
            AuthError::WechatError(Some(e))
        }
    }
}

/// A sealed value (a token pair, a phone number) that opened but does not parse: an internal
/// error that says where the parse failed, never what the value held (serde_json's message
/// quotes a value of the wrong type, and internal errors are logged).
fn unreadable(e: serde_json::Error) -> AuthError {
    AuthError::internal(anyhow::anyhow!(
        "a sealed value does not parse ({:?} error at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

/// What a phone number is sealed under: its user's openid, prefixed so that no ciphertext
/// of another kind sealed for the same user (the session_key, under the bare openid) opens
/// as a phone number, nor a phone number as a session_key.
fn phone_context(openid: &str) -> Vec<u8> {
    [b"phone\0".as_slice(), openid.as_bytes()].concat()
}

/// Opens a stored phone number: sealed under [`phone_context`], or, if it was stored before
/// numbers had a context of their own, under the bare openid. Such an older one parses as a
/// number only if it is one (a session_key is 16 raw bytes, never JSON).
fn open_phone(keys: &Keys, sealed: &[u8], openid: &str) -> Result<Vec<u8>, CryptoError> {
    keys.open(sealed, &phone_context(openid))
        .or_else(|_| keys.open(sealed, openid.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::cache::MemoryCache;
    use crate::store::{
        AccessRecord, AppTokenLock, LoginOutcome, SealedSessionKeys, StoredAppToken,
    };

    /// A store whose `set_phone` fails its first `failures` calls (with a transient error, or
    /// a lasting one), then keeps the number, and whose housekeeping expiry always fails
    /// while its purge counts its runs; nothing else of it is used by these tests.
    #[derive(Debug)]
    struct FlakyPhones {
        failures: AtomicUsize,
        lasting: bool,
        attempts: AtomicUsize,
        kept: Mutex<Option<Vec<u8>>>,
        purges: AtomicUsize,
        /// `forget`'s calls, with the cutoff each was given.
        forgets: Mutex<Vec<Millis>>,
        /// The call of `forget` (counted from 1) that fails; 0: none.
        forget_fails_at: AtomicUsize,
        /// Sessions `expire_sessions` has yet to end; `None`: it fails.
        due: Mutex<Option<u32>>,
        /// `expire_sessions`' calls that answered.
        expiries: AtomicUsize,
        /// The call of `expire_sessions` (counted from 1) that fails; 0: none.
        expire_fails_at: AtomicUsize,
        /// What `find_access` answers for every hash.
        access: Mutex<Option<AccessRecord>>,
        /// `touch`'s calls.
        touches: AtomicUsize,
    }

    impl FlakyPhones {
        fn failing(failures: usize, lasting: bool) -> Arc<Self> {
            Arc::new(Self {
                failures: AtomicUsize::new(failures),
                lasting,
                attempts: AtomicUsize::new(0),
                kept: Mutex::new(None),
                purges: AtomicUsize::new(0),
                forgets: Mutex::new(Vec::new()),
                forget_fails_at: AtomicUsize::new(0),
                due: Mutex::new(None),
                expiries: AtomicUsize::new(0),
                expire_fails_at: AtomicUsize::new(0),
                access: Mutex::new(None),
                touches: AtomicUsize::new(0),
            })
        }

        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Store for FlakyPhones {
        async fn set_phone(
            &self,
            _openid: &str,
            sealed: &[u8],
            _now: Millis,
        ) -> Result<bool, StoreError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let failed = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            match (failed, self.lasting) {
                (true, false) => Err(StoreError::Unavailable(anyhow::anyhow!(
                    "database is locked"
                ))),
                (true, true) => Err(StoreError::Other(anyhow::anyhow!("constraint failed"))),
                (false, _) => {
                    *self.kept.lock().expect("lock") = Some(sealed.to_vec());
                    Ok(true)
                }
            }
        }

        async fn phone(&self, _openid: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.kept.lock().expect("lock").clone())
        }

        async fn login(&self, _: NewLogin) -> Result<LoginOutcome, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn find_access(&self, _: &TokenHash) -> Result<Option<AccessRecord>, StoreError> {
            Ok(self.access.lock().expect("lock").clone())
        }
        async fn touch(&self, _: &str, _: Millis, _: Millis) -> Result<(), StoreError> {
            self.touches.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn refresh_session(
            &self,
            _: &TokenHash,
            _: Millis,
        ) -> Result<Option<(String, bool)>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn rotate(&self, _: Rotation) -> Result<RotateOutcome, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn end_sessions(
            &self,
            _: EndTarget<'_>,
            _: EndReason,
            _: Millis,
        ) -> Result<Vec<String>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn list_sessions(&self, _: &str, _: Millis) -> Result<Vec<SessionInfo>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn user_exists(&self, _: &str) -> Result<bool, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn list_events(
            &self,
            _: &str,
            _: Option<i64>,
            _: u32,
        ) -> Result<Vec<SessionEvent>, StoreError> {
            unreachable!("not used by these tests")
        }
        /// Fails, unless `due` holds a number of sessions to end: then a batch of them.
        async fn expire_sessions(&self, _: Option<&str>, _: Millis) -> Result<u32, StoreError> {
            let mut due = self.due.lock().expect("lock");
            let fails_at = self.expire_fails_at.load(Ordering::SeqCst);
            let calls = self.expiries.load(Ordering::SeqCst) + 1;
            let Some(left) = due.as_mut().filter(|_| fails_at != calls) else {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "canceling statement due to statement timeout"
                )));
            };
            let n = (*left).min(EXPIRE_BATCH);
            *left -= n;
            self.expiries.fetch_add(1, Ordering::SeqCst);
            Ok(n)
        }
        async fn purge(&self, _: Millis, _: Millis, _: Millis, _: u32) -> Result<u64, StoreError> {
            self.purges.fetch_add(1, Ordering::SeqCst);
            Ok(0)
        }
        /// Two full batches of events, then a full one of sessions, then a partial one.
        async fn forget(&self, before: Millis, batch: u32) -> Result<(u64, u64), StoreError> {
            let mut calls = self.forgets.lock().expect("lock");
            calls.push(before);
            if calls.len() == self.forget_fails_at.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable(anyhow::anyhow!(
                    "canceling statement due to statement timeout"
                )));
            }
            let full = u64::from(batch);
            Ok(match calls.len() {
                1 | 2 => (full, 3),
                3 => (0, full),
                _ => (7, 0),
            })
        }
        async fn session_keys(&self, _: &str) -> Result<Option<SealedSessionKeys>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn app_token(&self, _: &str) -> Result<Option<StoredAppToken>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn lock_app_token(&self, _: &str) -> Result<Box<dyn AppTokenLock>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn ping(&self) -> Result<(), StoreError> {
            unreachable!("not used by these tests")
        }
    }

    /// The core over `store`, with an in-process cache of its own; WeChat is never called.
    fn core_over(store: Arc<dyn Store>) -> AuthCore {
        core_with(store, Arc::new(MemoryCache::new()), &[])
    }

    /// The core over `store` and `cache` (a cache shared by several cores stands for Redis
    /// shared by replicas), with `settings` beside the required ones; WeChat is never called.
    fn core_with(
        store: Arc<dyn Store>,
        cache: Arc<dyn crate::cache::Cache>,
        settings: &[(&'static str, &str)],
    ) -> AuthCore {
        let _already = rustls::crypto::ring::default_provider().install_default();
        let mut env: std::collections::HashMap<&str, String> = [
            ("WECHAT_APPID", "wx1234567890abcdef".to_owned()),
            ("WECHAT_SECRET", "s3cr3t-value".to_owned()),
            ("AUTH_TOKEN_KEY", "k".repeat(32)),
            ("WECHAT_API_BASE", "http://127.0.0.1:1/".to_owned()),
        ]
        .into_iter()
        .collect();
        env.extend(settings.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("settings");
        AuthCore::new(
            store,
            cache,
            WechatClient::new(&settings.wechat).expect("client"),
            Arc::new(Keys::derive(&settings.token_key)),
            Policy::from_settings(&settings),
        )
    }

    fn number() -> PhoneNumber {
        PhoneNumber {
            phone_number: "13800138000".into(),
            pure_phone_number: "13800138000".into(),
            country_code: "86".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_billed_phone_number_whose_write_fails_for_a_moment_is_kept_on_retry() {
        let store = FlakyPhones::failing(2, false);
        let core = core_over(store.clone());

        core.store_phone("o1", &number())
            .await
            .expect("kept after two failed writes");

        assert_eq!(store.attempts(), 3);
        assert_eq!(core.stored_phone("o1").await.expect("read"), Some(number()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_phone_number_write_that_keeps_failing_gives_up_within_seconds() {
        let store = FlakyPhones::failing(usize::MAX, false);
        let core = core_over(store.clone());
        let started = tokio::time::Instant::now();

        let err = core
            .store_phone("o1", &number())
            .await
            .expect_err("never stored");

        assert!(matches!(err, AuthError::Unavailable(_)), "{err:?}");
        assert_eq!(store.attempts(), 4);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took <= Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(core.stored_phone("o1").await.expect("read"), None);
    }

    /// A real SQLite store in `dir` holding user `o1`'s session `s1`, opened at `opened`
    /// (its last activity), and the session's access token (keyed as [`core_with`]'s).
    async fn store_with_a_session(
        dir: &tempfile::TempDir,
        opened: Millis,
    ) -> (Arc<dyn Store>, Token) {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("auth.db"))
                .await
                .expect("the store"),
        );
        let keys = Keys::derive(&secrecy::SecretString::from("k".repeat(32)));
        let token = Token::generate(TokenKind::Access).expect("random");
        let now = now_millis();
        store
            .login(NewLogin {
                openid: "o1".into(),
                unionid: None,
                session_key_sealed: vec![1],
                session_key_fp: [1; 32],
                session_id: "s1".into(),
                device: crate::domain::Device::default(),
                access: (keys.token_hash(&token), now + 3_600_000),
                refresh: (TokenHash([9; 32]), now + 86_400_000),
                policy: crate::domain::SessionPolicy::Multi { max: 5 },
                now: opened,
            })
            .await
            .expect("login");
        (store, token)
    }

    /// An in-process cache (standing for Redis) whose `mark_ended` fails while `failing`
    /// is set, as a Redis connection reset at that moment would; all else it answers.
    #[derive(Debug, Default)]
    struct EndsRefused {
        inner: MemoryCache,
        failing: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl crate::cache::Cache for EndsRefused {
        async fn claim_code(&self, code: &str, ttl: Duration) -> Result<CodeClaim, CacheError> {
            self.inner.claim_code(code, ttl).await
        }
        async fn finish_code(
            &self,
            code: &str,
            used: bool,
            ttl: Duration,
        ) -> Result<(), CacheError> {
            self.inner.finish_code(code, used, ttl).await
        }
        async fn hit(
            &self,
            key: &str,
            limit: u32,
            window: Duration,
        ) -> Result<RateDecision, CacheError> {
            self.inner.hit(key, limit, window).await
        }
        async fn session_mark(&self, session_id: &str) -> Result<Option<SessionMark>, CacheError> {
            self.inner.session_mark(session_id).await
        }
        async fn mark_alive(&self, session_id: &str, ttl: Duration) -> Result<(), CacheError> {
            self.inner.mark_alive(session_id, ttl).await
        }
        async fn mark_ended(
            &self,
            session_ids: &[String],
            ttl: Duration,
        ) -> Result<(), CacheError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(CacheError(anyhow::anyhow!("connection reset by peer")));
            }
            self.inner.mark_ended(session_ids, ttl).await
        }
        async fn session_mark_and_phone_stamp(
            &self,
            session_id: &str,
            openid: &str,
        ) -> Result<(Option<SessionMark>, PhoneStamp), CacheError> {
            self.inner
                .session_mark_and_phone_stamp(session_id, openid)
                .await
        }
        async fn phone_stamp(&self, openid: &str) -> Result<PhoneStamp, CacheError> {
            self.inner.phone_stamp(openid).await
        }
        async fn new_phone_stamp(&self, openid: &str) -> Result<Option<String>, CacheError> {
            self.inner.new_phone_stamp(openid).await
        }
        async fn phone_write_started(&self, openid: &str, ttl: Duration) -> Result<(), CacheError> {
            self.inner.phone_write_started(openid, ttl).await
        }
        async fn phone_write_ended(&self, openid: &str) -> Result<(), CacheError> {
            self.inner.phone_write_ended(openid).await
        }
        async fn sweep(&self) {
            self.inner.sweep().await;
        }
    }

    #[tokio::test]
    async fn a_session_ended_here_whose_mark_the_cache_refused_is_not_answered_from_memory() {
        // Arrange: the token is in this replica's Verify memory, its session marked alive
        // in the cache; then the cache refuses marks of ends (a connection reset), but
        // reads again at once.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, token) = store_with_a_session(&dir, now_millis()).await;
        let cache = Arc::new(EndsRefused::default());
        let core = core_with(store, cache.clone(), &[]);
        core.verify(token.expose()).await.expect("live");
        cache.failing.store(true, Ordering::SeqCst);

        // Act: the user logs out here; the `Ended` mark does not reach the cache, whose
        // `Alive` mark stays.
        core.logout(token.expose(), false).await.expect("logout");

        // Assert: the very next Verify here is refused, from the database.
        let refused = core.verify(token.expose()).await;
        assert!(
            matches!(refused, Err(AuthError::TokenRevoked)),
            "{refused:?}"
        );

        // And once the retry lands, the cache's mark keeps refusing it.
        cache.failing.store(false, Ordering::SeqCst);
        let mut marked = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            marked = cache.session_mark("s1").await.expect("read");
            if marked == Some(SessionMark::Ended) {
                break;
            }
        }
        assert_eq!(marked, Some(SessionMark::Ended), "the retry marked it");
        let refused = core.verify(token.expose()).await;
        assert!(
            matches!(refused, Err(AuthError::TokenRevoked)),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn an_end_on_a_replica_without_verify_memory_still_tells_the_others() {
        // Arrange: two replicas on one store and one shared cache (Redis, in production);
        // A keeps no Verify memory (AUTH_VERIFY_CACHE_SIZE=0), B does and has the token in
        // it, its session marked alive.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, token) = store_with_a_session(&dir, now_millis()).await;
        let shared: Arc<dyn crate::cache::Cache> = Arc::new(MemoryCache::new());
        let a = core_with(
            store.clone(),
            shared.clone(),
            &[("AUTH_VERIFY_CACHE_SIZE", "0")],
        );
        let b = core_with(store, shared, &[]);
        b.verify(token.expose()).await.expect("live");

        // Act: the user logs out through A.
        a.logout(token.expose(), false).await.expect("logout");

        // Assert: B refuses the token at once.
        let refused = b.verify(token.expose()).await;
        assert!(
            matches!(refused, Err(AuthError::TokenRevoked)),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn verify_moves_a_sessions_last_activity_at_most_once_a_minute() {
        // Arrange: a session opened two minutes ago and idle since, on a real store.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now = now_millis();
        let opened = now - 120_000;
        let (store, token) = store_with_a_session(&dir, opened).await;
        let core = core_over(store.clone());
        let last_active =
            async || store.list_sessions("o1", now_millis()).await.expect("list")[0].last_active_at;
        assert_eq!(last_active().await, opened);

        // Act: a Verify; its write is off the request's path, so wait for it (bounded).
        core.verify(token.expose()).await.expect("verify");
        let mut moved = last_active().await;
        for _ in 0..100 {
            if moved >= now {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            moved = last_active().await;
        }

        // Assert: it moved to the Verify's time (how often it is written: the next test).
        assert!(
            moved >= now,
            "last_active_at {moved} never moved past {now}"
        );
    }

    #[tokio::test]
    async fn verify_sends_one_touch_a_minute_however_many_calls() {
        // The store's own guard (`last_active_at <= now - 60 s`) would hide extra writes
        // from a real store: this one counts the calls. The touch runs in a task of its
        // own; on this test's one-thread runtime, yielding lets it run.
        async fn touches_after(store: &FlakyPhones) -> usize {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            store.touches.load(Ordering::SeqCst)
        }
        let now = now_millis();
        let record = |last_active_at| AccessRecord {
            openid: "o1".into(),
            unionid: None,
            session_id: "s1".into(),
            expires_at: now + 3_600_000,
            last_active_at,
            ended: None,
            refresh_expires_at: now + 86_400_000,
        };
        let token = Token::generate(TokenKind::Access).expect("random");

        // Idle for two minutes: the first Verify touches, the next ten (from memory, within
        // the minute) do not.
        let idle = FlakyPhones::failing(0, false);
        *idle.access.lock().expect("lock") = Some(record(now - 120_000));
        let core = core_over(idle.clone());
        core.verify(token.expose()).await.expect("verify");
        assert_eq!(touches_after(&idle).await, 1);
        for _ in 0..10 {
            core.verify(token.expose()).await.expect("verify");
        }
        assert_eq!(touches_after(&idle).await, 1);

        // Active ten seconds ago: no touch is due yet.
        let active = FlakyPhones::failing(0, false);
        *active.access.lock().expect("lock") = Some(record(now - 10_000));
        let core = core_over(active.clone());
        for _ in 0..5 {
            core.verify(token.expose()).await.expect("verify");
        }
        assert_eq!(touches_after(&active).await, 0);
    }

    #[tokio::test]
    async fn a_failing_expiry_does_not_keep_housekeeping_from_purging() {
        let store = FlakyPhones::failing(0, false);
        let core = core_over(store.clone());

        let outcome = core.housekeeping().await;

        assert!(
            matches!(outcome, Err(AuthError::Unavailable(_))),
            "{outcome:?}"
        );
        assert_eq!(
            store.purges.load(Ordering::SeqCst),
            1,
            "purged all the same"
        );
    }

    #[tokio::test]
    async fn housekeeping_ends_every_due_session_a_batch_at_a_time() {
        // Arrange: two and a half batches due.
        let store = FlakyPhones::failing(0, false);
        *store.due.lock().expect("lock") = Some(2 * EXPIRE_BATCH + 500);
        let core = core_over(store.clone());

        // Act
        let (expired, result) = core.expire_due_sessions(now_millis()).await;

        // Assert
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(expired, 2 * EXPIRE_BATCH + 500);
        assert_eq!(
            store.expiries.load(Ordering::SeqCst),
            3,
            "until a batch was not full"
        );
        assert_eq!(*store.due.lock().expect("lock"), Some(0));
    }

    #[tokio::test]
    async fn a_failing_expiry_batch_keeps_the_count_of_those_before_it() {
        let store = FlakyPhones::failing(0, false);
        *store.due.lock().expect("lock") = Some(3 * EXPIRE_BATCH);
        store.expire_fails_at.store(3, Ordering::SeqCst);
        let core = core_over(store.clone());

        let (expired, result) = core.expire_due_sessions(now_millis()).await;

        assert!(result.is_err(), "the third batch failed");
        assert_eq!(expired, 2 * EXPIRE_BATCH, "the two committed before it");
    }

    #[test]
    fn logins_count_by_ipv4_address_and_by_ipv6_64() {
        let key = |ip: &str| login_rate_key(ip.parse().expect("an address"));
        assert_eq!(key("203.0.113.9"), "login-ip:203.0.113.9");
        assert_eq!(key("::ffff:203.0.113.9"), "login-ip:203.0.113.9");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "login-ip:2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::1"), key("2001:db8:1:2::7"));
        assert_ne!(key("2001:db8:1:2::7"), key("2001:db8:1:3::7"));
    }

    #[tokio::test]
    async fn housekeeping_forgets_the_history_past_retention_until_a_batch_is_not_full() {
        let store = FlakyPhones::failing(0, false);
        let core = core_with(
            store.clone(),
            Arc::new(MemoryCache::new()),
            &[("AUTH_HISTORY_RETENTION", "40d")],
        );
        let full = u64::from(HOUSEKEEPING_BATCH);

        let before = now_millis();
        let (forgotten, outcome) = core.forget_history(before).await;

        outcome.expect("forget");
        assert_eq!(forgotten, (2 * full + 7, 6 + full));
        let calls = store.forgets.lock().expect("lock").clone();
        assert_eq!(calls, vec![before - 40 * 86_400_000; 4]);
    }

    #[tokio::test]
    async fn a_failing_batch_keeps_the_counts_of_the_batches_committed_before_it() {
        let store = FlakyPhones::failing(0, false);
        store.forget_fails_at.store(3, Ordering::SeqCst);
        let core = core_with(
            store.clone(),
            Arc::new(MemoryCache::new()),
            &[("AUTH_HISTORY_RETENTION", "40d")],
        );
        let full = u64::from(HOUSEKEEPING_BATCH);

        let (forgotten, outcome) = core.forget_history(now_millis()).await;

        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert_eq!(forgotten, (2 * full, 6), "the two batches committed");
        assert_eq!(
            store.forgets.lock().expect("lock").len(),
            3,
            "no batch after the failure"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_store_error_is_not_retried() {
        let store = FlakyPhones::failing(1, true);
        let core = core_over(store.clone());

        let err = core
            .store_phone("o1", &number())
            .await
            .expect_err("not stored");

        assert!(matches!(err, AuthError::Internal(_)), "{err:?}");
        assert_eq!(store.attempts(), 1);
    }

    fn err(code: i64) -> WechatErr {
        WechatErr {
            errcode: code,
            errmsg: "m".into(),
        }
    }

    #[test]
    fn every_wechat_errcode_has_its_error() {
        assert!(matches!(
            wechat_error(err(40029)),
            AuthError::WechatInvalidCode(_)
        ));
        assert!(matches!(
            wechat_error(err(40163)),
            AuthError::WechatCodeUsed(_)
        ));
        assert!(matches!(
            wechat_error(err(45011)),
            AuthError::WechatRateLimited(_)
        ));
        assert!(matches!(
            wechat_error(err(40226)),
            AuthError::WechatRiskyUser(_)
        ));
        assert!(matches!(wechat_error(err(-1)), AuthError::WechatBusy(_)));
        for other in [40013, 40125, 40164, 99999] {
            assert!(matches!(
                wechat_error(err(other)),
                AuthError::WechatError(Some(_))
            ));
        }
    }

    #[test]
    fn an_unreadable_sealed_value_is_not_quoted() {
        let e = serde_json::from_slice::<PhoneNumber>(br#"{"phone_number": 13800138000}"#)
            .expect_err("a number where a string goes");
        assert!(
            e.to_string().contains("13800138000"),
            "serde quotes it: {e}"
        );
        let AuthError::Internal(cause) = unreadable(e) else {
            panic!("internal");
        };
        assert!(!format!("{cause:?}").contains("13800138000"), "{cause:?}");
    }

    #[test]
    fn ended_sessions_tell_their_reason() {
        assert!(matches!(
            ended(EndReason::Replaced),
            AuthError::SessionReplaced
        ));
        assert!(matches!(ended(EndReason::Expired), AuthError::TokenExpired));
        assert!(matches!(ended(EndReason::Logout), AuthError::TokenRevoked));
        assert!(matches!(
            ended(EndReason::RevokedByOperator),
            AuthError::TokenRevoked
        ));
    }

    #[test]
    fn memory_is_used_only_where_every_write_is_seen() {
        let policy = |database: &str, redis: Option<&str>, size: Option<&str>| {
            let env: std::collections::HashMap<&str, String> = [
                ("WECHAT_APPID", Some("wx1234567890abcdef")),
                ("WECHAT_SECRET", Some("s3cr3t-value")),
                ("AUTH_TOKEN_KEY", Some("k".repeat(32)).as_deref()),
                ("AUTH_DATABASE_URL", Some(database)),
                ("AUTH_REDIS_URL", redis),
                ("AUTH_VERIFY_CACHE_SIZE", size),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v.to_owned())))
            .collect();
            let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("settings");
            let p = Policy::from_settings(&settings);
            (p.verify_cache, p.kept_phones, p.phone_stamps)
        };
        let pg = "postgres://u@127.0.0.1:5432/db";
        let redis = Some("redis://127.0.0.1:6379");

        // SQLite is one process: tokens' facts and phone numbers both.
        assert_eq!(
            policy("sqlite://a.db", None, None),
            (100_000, 100_000, false)
        );
        // With Redis, SQLite is still one process: no stamps needed.
        assert_eq!(
            policy("sqlite://a.db", redis, None),
            (100_000, 100_000, false)
        );
        // Several replicas with Redis: the marks are shared, and so are the numbers' stamps.
        assert_eq!(policy(pg, redis, None), (100_000, 100_000, true));
        // PostgreSQL alone: neither.
        assert_eq!(policy(pg, None, None), (0, 0, false));
        // 0 turns both off.
        assert_eq!(policy("sqlite://a.db", None, Some("0")), (0, 0, false));
        assert_eq!(policy(pg, redis, Some("0")), (0, 0, true));
    }

    #[test]
    fn phone_numbers_and_session_keys_do_not_open_as_each_other() {
        let keys = Keys::derive(&secrecy::SecretString::from("k".repeat(32)));
        let openid = "o-user-1";
        let number = br#"{"phone_number":"13800000000"}"#;
        let sealed = keys.seal(number, &phone_context(openid)).expect("seal");
        assert_eq!(open_phone(&keys, &sealed, openid).expect("opens"), number);
        // Not as a session_key of the same user (sealed under the bare openid), nor as
        // another user's number.
        assert!(keys.open(&sealed, openid.as_bytes()).is_err());
        assert!(open_phone(&keys, &sealed, "o-user-2").is_err());
        // A session_key's ciphertext does not open under the phone's own context; a number
        // stored before numbers had one (under the bare openid) still opens.
        let session_key = keys.seal(&[7u8; 16], openid.as_bytes()).expect("seal");
        assert!(keys.open(&session_key, &phone_context(openid)).is_err());
        let older = keys.seal(number, openid.as_bytes()).expect("seal");
        assert_eq!(open_phone(&keys, &older, openid).expect("opens"), number);
    }
}
