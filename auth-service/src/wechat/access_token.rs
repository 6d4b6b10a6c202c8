//! The app's WeChat access_token (WECHAT.md §4), owned by auth-service: one token for every
//! replica, fetched with `stable_token`, kept sealed in the database (one row per appid,
//! with a generation that counts renewals) and in each process's memory.
//!
//! - Reading: memory while the token has more than [`RENEW_MARGIN`] left (or, for a token
//!   WeChat answered with less than that, for [`SHORT_TOKEN_HOLD`] after it answered); else
//!   the database; else a renewal. For callers of `GetWechatAccessToken`, the stored
//!   generation is read first ([`AccessTokens::current_for_callers`]): another replica's
//!   forced refresh ends the token in memory.
//! - Renewing (`force_refresh: false`): one task per process at a time (a process-wide
//!   mutex), and one replica at a time: the renewer locks the token's row
//!   ([`Store::lock_app_token`]), looks again, and asks WeChat only if no one renewed it
//!   meanwhile. WeChat answers a new token in the last 5 minutes of the old one, and the old
//!   one keeps working until it expires, so a renewal never breaks a call in flight. When a
//!   renewal fails, the held token is handed out while it works (without one, the failure is
//!   answered), and WeChat is asked again [`RETRY_RENEWAL_AFTER`] later, not by every caller
//!   in turn.
//! - A token WeChat refuses (40001/42001) is [`AccessTokens::invalidated`]: under the same
//!   lock, if the row still holds the generation that failed, one forced refresh
//!   (`force_refresh: true`, which ends the old token at once and is limited to 20 a day);
//!   if the row moved on, the newer token is used and WeChat is not asked.
//!
//! The token never appears in logs: only its generation and expiry do.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use tracing::{info, warn};

use super::{AppAccessToken, WechatCallError, WechatClient};
use crate::crypto::{CryptoError, Keys};
use crate::domain::{Millis, millis, now_millis};
use crate::error::WechatErr;
use crate::store::{AppTokenLock, Store, StoreError, StoredAppToken};

/// A token with less than this left is renewed (WeChat makes the next one in the last 5
/// minutes of the current one).
pub const RENEW_MARGIN: Duration = Duration::from_secs(300);

/// A token WeChat answered with [`RENEW_MARGIN`] or less left (stable_token answers the current
/// token while it is valid) is handed out this long after the answer, or half its remaining
/// life if that is shorter, before WeChat is asked again: renewing it "in its last five
/// minutes" at once would make every call ask WeChat again, for the same token.
const SHORT_TOKEN_HOLD: Duration = Duration::from_secs(60);

/// After a renewal failed at WeChat, how long WeChat is not asked again: the held token is
/// handed out while it works, and without one the failure is answered again. Each caller
/// would otherwise take its turn and wait up to `AUTH_WECHAT_TIMEOUT` for the same failure.
const RETRY_RENEWAL_AFTER: Duration = Duration::from_secs(15);

/// The app's access_token as handed out.
#[derive(Clone)]
pub struct AppToken {
    token: SecretString,
    expires_at: Millis,
    /// When WeChat answered it.
    renewed_at: Millis,
    generation: i64,
}

impl AppToken {
    /// The token itself. Never log it.
    pub fn secret(&self) -> &SecretString {
        &self.token
    }

    /// When WeChat said it expires.
    pub fn expires_at(&self) -> Millis {
        self.expires_at
    }

    /// Its generation in the store: equal generations, equal tokens.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Whether it is handed out without asking WeChat first: until [`RENEW_MARGIN`] before
    /// its expiry, and in any case for [`SHORT_TOKEN_HOLD`] (at most half the life it had
    /// left) after WeChat answered it.
    fn fresh(&self, now: Millis) -> bool {
        let usual = self.expires_at.saturating_sub(millis(RENEW_MARGIN));
        let life_left = self.expires_at.saturating_sub(self.renewed_at).max(0);
        let held = self
            .renewed_at
            .saturating_add(millis(SHORT_TOKEN_HOLD).min(life_left / 2));
        now < usual.max(held)
    }
}

impl std::fmt::Debug for AppToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppToken")
            .field("expires_at", &self.expires_at)
            .field("renewed_at", &self.renewed_at)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum AccessTokenError {
    /// WeChat refused or could not be reached (its "busy" already retried once).
    #[error(transparent)]
    Wechat(WechatCallError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A new token could not be sealed.
    #[error("cannot seal the access_token: {0}")]
    Seal(#[source] CryptoError),
    /// No token works, and WeChat failed a renewal less than [`RETRY_RENEWAL_AFTER`] ago: it
    /// is not asked again so soon (each caller would wait its turn for the same failure).
    #[error("WeChat failed to renew the access_token moments ago: {0}")]
    Recent(RecentFailure),
}

/// How WeChat failed the last renewal, repeated to callers for a while.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecentFailure {
    /// An errcode.
    #[error("errcode {}", .0.errcode)]
    Api(WechatErr),
    /// No answer in time, or no connection.
    #[error("unreachable")]
    Unreachable,
    /// An answer WeChat's API does not document.
    #[error("malformed answer")]
    Malformed,
}

impl RecentFailure {
    fn of(e: &WechatCallError) -> Self {
        match e {
            WechatCallError::Api(e) => Self::Api(e.clone()),
            WechatCallError::Unreachable(_) => Self::Unreachable,
            WechatCallError::Malformed(_) => Self::Malformed,
        }
    }
}

/// The app's access_token, shared by every call of this process.
pub struct AccessTokens {
    store: Arc<dyn Store>,
    wechat: WechatClient,
    keys: Arc<Keys>,
    /// What the token is sealed with: `wechat-access-token:<appid>`.
    context: String,
    /// The last token seen.
    cached: Mutex<Option<AppToken>>,
    /// One renewal (or look at the database) at a time in this process.
    turn: tokio::sync::Mutex<()>,
    /// When the last renewal failed at WeChat, and how, if that was the last renewal tried.
    failed_renewal: Mutex<Option<(std::time::Instant, RecentFailure)>>,
}

impl std::fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokens")
            .field("appid", &self.wechat.appid())
            .finish_non_exhaustive()
    }
}

impl AccessTokens {
    /// The token of `wechat`'s app, kept in `store`, sealed with `keys`.
    pub fn new(store: Arc<dyn Store>, wechat: WechatClient, keys: Arc<Keys>) -> Self {
        let context = format!("wechat-access-token:{}", wechat.appid());
        Self {
            store,
            wechat,
            keys,
            context,
            cached: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            failed_renewal: Mutex::new(None),
        }
    }

    /// A token with more than [`RENEW_MARGIN`] left (or one WeChat answered with less, within
    /// its [`SHORT_TOKEN_HOLD`]), renewed first if need be.
    pub async fn current(&self) -> Result<AppToken, AccessTokenError> {
        if let Some(token) = self.cached().filter(|t| t.fresh(now_millis())) {
            return Ok(token);
        }
        let _turn = self.turn.lock().await;
        // Another task of this process may have renewed it while this one waited.
        if let Some(token) = self.cached().filter(|t| t.fresh(now_millis())) {
            return Ok(token);
        }
        // Another replica may have: a plain read first, no lock for the common case.
        if let Some(token) = self
            .store
            .app_token(self.wechat.appid())
            .await?
            .and_then(|stored| self.open(&stored))
            .filter(|t| t.fresh(now_millis()))
        {
            self.remember(&token);
            return Ok(token);
        }
        // A renewal failed a moment ago: WeChat is not asked again so soon. The token held
        // is handed out while it works; without one, the failure is.
        if let Some(failure) = self.renewal_failed_recently() {
            return match self.cached().filter(|t| t.expires_at > now_millis()) {
                Some(token) => Ok(token),
                None => Err(AccessTokenError::Recent(failure)),
            };
        }
        // Renewal: hold the row, look again (another replica may have renewed it while this
        // one waited for the lock), and only then ask WeChat.
        let lock = self.store.lock_app_token(self.wechat.appid()).await?;
        let held = lock.current().and_then(|stored| self.open(stored));
        if let Some(token) = held.clone().filter(|t| t.fresh(now_millis())) {
            lock.release().await?;
            self.remember(&token);
            return Ok(token);
        }
        let renewed = self.renew(lock, false).await;
        if let Err(AccessTokenError::Wechat(e)) = &renewed {
            *self
                .failed_renewal
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                Some((std::time::Instant::now(), RecentFailure::of(e)));
        }
        match renewed {
            // WeChat failed in the token's last minutes: it still works until it expires.
            Err(e) if held.as_ref().is_some_and(|t| t.expires_at > now_millis()) => {
                warn!(error = %e, retry_after = ?RETRY_RENEWAL_AFTER, "could not renew the app's access_token; using it until it expires");
                let token = held.ok_or(e)?;
                self.remember(&token);
                Ok(token)
            }
            renewed => renewed,
        }
    }

    /// [`Self::current`] for a caller outside this process (`GetWechatAccessToken`), checked
    /// against the store first: another replica's forced refresh ends the token this one
    /// holds in memory at once, and only the stored generation tells. This process's own
    /// calls skip the read: a refused token sends them to [`Self::invalidated`], which finds
    /// the newer one.
    pub async fn current_for_callers(&self) -> Result<AppToken, AccessTokenError> {
        if let Some(stored) = self.store.app_token(self.wechat.appid()).await? {
            let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
            if cached
                .as_ref()
                .is_some_and(|held| held.generation < stored.generation)
            {
                // Forgotten, not replaced here: `current` opens the stored one (or renews it
                // when it is near its end) under its turn.
                *cached = None;
            }
        }
        self.current().await
    }

    /// WeChat refused `failed` as invalid or expired (40001/42001): a token that works,
    /// force-refreshed at WeChat only if `failed` is still the current one, once across
    /// every replica however many calls saw it fail.
    pub async fn invalidated(&self, failed: &AppToken) -> Result<AppToken, AccessTokenError> {
        let _turn = self.turn.lock().await;
        if let Some(token) = self.cached().filter(|t| t.generation != failed.generation) {
            return Ok(token);
        }
        let lock = self.store.lock_app_token(self.wechat.appid()).await?;
        let moved_on = lock
            .current()
            .filter(|stored| stored.generation != failed.generation)
            .and_then(|stored| self.open(stored));
        if let Some(token) = moved_on {
            lock.release().await?;
            self.remember(&token);
            return Ok(token);
        }
        warn!(
            generation = failed.generation,
            "WeChat refused the app's access_token; forcing a refresh"
        );
        self.renew(lock, true).await
    }

    /// Asks WeChat while holding `lock`, stores the answer as the next generation.
    async fn renew(
        &self,
        lock: Box<dyn AppTokenLock>,
        force_refresh: bool,
    ) -> Result<AppToken, AccessTokenError> {
        let fetched = match self.fetch(force_refresh).await {
            Ok(fetched) => fetched,
            Err(e) => {
                if let Err(release) = lock.release().await {
                    warn!(error = %release, "could not release the access_token row");
                }
                return Err(e);
            }
        };
        let now = now_millis();
        let expires_at = now.saturating_add(millis(fetched.expires_in));
        let sealed = self
            .keys
            .seal(
                fetched.token.expose_secret().as_bytes(),
                self.context.as_bytes(),
            )
            .map_err(AccessTokenError::Seal)?;
        let stored = lock.replace(sealed, expires_at, now).await?;
        info!(
            generation = stored.generation,
            force_refresh,
            expires_in_secs = fetched.expires_in.as_secs(),
            "the app's WeChat access_token was renewed"
        );
        let token = AppToken {
            token: fetched.token,
            expires_at,
            renewed_at: stored.renewed_at,
            generation: stored.generation,
        };
        *self
            .failed_renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.remember(&token);
        Ok(token)
    }

    /// stable_token, retrying WeChat's "busy" (-1) once.
    async fn fetch(&self, force_refresh: bool) -> Result<AppAccessToken, AccessTokenError> {
        let mut busy_once = false;
        loop {
            match self.wechat.stable_token(force_refresh).await {
                Err(WechatCallError::Api(e)) if e.errcode == -1 && !busy_once => {
                    busy_once = true;
                    warn!(
                        errcode = e.errcode,
                        "WeChat is busy; retrying stable_token once"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answer => return answer.map_err(AccessTokenError::Wechat),
            }
        }
    }

    /// The stored token, opened; `None` (and a warning) if it cannot be, as after a change of
    /// `AUTH_TOKEN_KEY`: it is then simply renewed.
    fn open(&self, stored: &StoredAppToken) -> Option<AppToken> {
        let plain = match self.keys.open(&stored.sealed, self.context.as_bytes()) {
            Ok(plain) => plain,
            Err(e) => {
                warn!(error = %e, generation = stored.generation, "the stored access_token cannot be opened; renewing it");
                return None;
            }
        };
        let token = String::from_utf8(plain).ok()?;
        Some(AppToken {
            token: SecretString::from(token),
            expires_at: stored.expires_at,
            renewed_at: stored.renewed_at,
            generation: stored.generation,
        })
    }

    /// How WeChat failed the last renewal, if that was less than [`RETRY_RENEWAL_AFTER`] ago.
    fn renewal_failed_recently(&self) -> Option<RecentFailure> {
        self.failed_renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < RETRY_RENEWAL_AFTER)
            .map(|(_, failure)| failure.clone())
    }

    fn cached(&self) -> Option<AppToken> {
        self.cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn remember(&self, token: &AppToken) {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        // Never back to an older generation (a slow reader racing a renewal).
        if cached
            .as_ref()
            .is_none_or(|c| c.generation <= token.generation)
        {
            *cached = Some(token.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    /// A token WeChat answered two hours before it expires, at `expires_at - 7200 s`.
    fn token(expires_at: Millis, generation: i64) -> AppToken {
        answered(expires_at - 7_200_000, expires_at, generation)
    }

    fn answered(renewed_at: Millis, expires_at: Millis, generation: i64) -> AppToken {
        AppToken {
            token: SecretString::from("AT-secret-value".to_owned()),
            expires_at,
            renewed_at,
            generation,
        }
    }

    #[test]
    fn a_token_is_renewed_in_its_last_five_minutes() {
        let now = NOW;
        assert!(token(now + 7_200_000, 1).fresh(now));
        assert!(token(now + 300_001, 1).fresh(now));
        assert!(!token(now + 300_000, 1).fresh(now));
        assert!(!token(now - 1, 1).fresh(now));
    }

    #[test]
    fn a_token_answered_with_little_left_is_held_a_minute_or_half_its_life() {
        // 200 s left when WeChat answered it: held 60 s, then due.
        let short = answered(NOW, NOW + 200_000, 1);
        assert!(short.fresh(NOW));
        assert!(short.fresh(NOW + 59_999));
        assert!(!short.fresh(NOW + 60_000));
        // 30 s left: held half of it, 15 s.
        let shorter = answered(NOW, NOW + 30_000, 1);
        assert!(shorter.fresh(NOW + 14_999));
        assert!(!shorter.fresh(NOW + 15_000));
        // Already expired when answered (a clock behind WeChat's): never held.
        assert!(!answered(NOW, NOW - 1, 1).fresh(NOW));
        // Unknown answer time (0): the usual rule.
        assert!(!answered(0, NOW + 200_000, 1).fresh(NOW));
    }

    /// The app's tokens over an SQLite store in `dir` that holds a token answered by WeChat
    /// at `renewed_at` to expire at `expires_at` (generation 1); WeChat itself refuses every
    /// connection, so a renewal tried shows as a failed one.
    async fn stored_token(
        dir: &tempfile::TempDir,
        renewed_at: Millis,
        expires_at: Millis,
    ) -> AccessTokens {
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("auth.db"))
            .await
            .expect("SQLite store");
        let keys = Arc::new(Keys::derive(&SecretString::from("k".repeat(32))));
        // As at start-up: the process's rustls provider (installed once; later calls no-op).
        let _already = rustls::crypto::ring::default_provider().install_default();
        let wechat = WechatClient::new(&crate::config::WechatSettings {
            appid: "wxtest".into(),
            secret: SecretString::from("s3cr3t".to_owned()),
            api_base: reqwest::Url::parse("http://127.0.0.1:1/").expect("url"),
            timeout: Duration::from_secs(2),
        })
        .expect("client");
        let tokens = AccessTokens::new(Arc::new(store.clone()), wechat, keys.clone());
        let sealed = keys
            .seal(b"AT-short-lived", tokens.context.as_bytes())
            .expect("seal");
        let lock = store.lock_app_token("wxtest").await.expect("lock");
        lock.replace(sealed, expires_at, renewed_at)
            .await
            .expect("replace");
        tokens
    }

    fn renewal_tried(tokens: &AccessTokens) -> bool {
        tokens
            .failed_renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_just_answered_with_little_left_is_not_asked_for_again() {
        // WeChat answered a token with 200 s left (less than the renewal margin) a moment ago.
        let dir = tempfile::tempdir().expect("temporary directory");
        let now = now_millis();
        let tokens = stored_token(&dir, now, now + 200_000).await;

        let mut calls = Vec::new();
        let tokens = Arc::new(tokens);
        for _ in 0..10 {
            let tokens = tokens.clone();
            calls.push(tokio::spawn(async move { tokens.current().await }));
        }
        for call in calls {
            let token = call.await.expect("join").expect("a token");
            assert_eq!(token.generation(), 1);
            assert_eq!(token.secret().expose_secret(), "AT-short-lived");
        }
        assert!(
            !renewal_tried(&tokens),
            "WeChat was asked again for a token it answered a moment ago"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_lived_token_is_renewed_once_its_hold_is_over() {
        // Answered 100 s ago with 200 s left: held for 60 s, so due now; the renewal fails
        // (WeChat unreachable) and the token, still valid, is handed out meanwhile.
        let dir = tempfile::tempdir().expect("temporary directory");
        let now = now_millis();
        let tokens = stored_token(&dir, now - 100_000, now + 100_000).await;

        let token = tokens.current().await.expect("the held token");
        assert_eq!(token.generation(), 1);
        assert!(renewal_tried(&tokens), "a due token was not renewed");
    }

    #[test]
    fn debug_output_hides_the_token() {
        let shown = format!("{:?}", token(1, 7));
        assert!(!shown.contains("AT-secret-value"), "{shown}");
        assert!(shown.contains("generation: 7"), "{shown}");
    }
}
