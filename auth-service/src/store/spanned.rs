//! A store whose every operation runs in a tracing span of the call it serves.
//!
//! sqlx runs SQLite's statements on a thread of its own, and what it logs there (a
//! statement slower than a second, a rollback that failed) goes out in the tracing span
//! that was current when the statement was sent. A call's request id is a task-local
//! (`shared::telemetry`) that no other thread sees, so without a span those lines would
//! carry no request id. Only SQLite needs this (PostgreSQL's statements are logged on the
//! caller's task), and a span per store operation is nothing beside the operation. The
//! [`AppTokenLock`] it hands out is wrapped too: its statements run inside the same
//! `BEGIN IMMEDIATE` transaction, later in the call.

use async_trait::async_trait;
use shared::telemetry::call_span;
use tracing::Instrument as _;

use super::{
    AccessRecord, AppTokenLock, EndTarget, LoginOutcome, NewLogin, RotateOutcome, Rotation,
    SealedSessionKeys, Store, StoreError, StoredAppToken,
};
use crate::crypto::TokenHash;
use crate::domain::{EndReason, Millis, SessionEvent, SessionInfo};

/// `S`, each operation in [`call_span`].
#[derive(Debug)]
pub struct CallSpanned<S>(pub S);

#[async_trait]
impl<S: Store> Store for CallSpanned<S> {
    async fn login(&self, login: NewLogin) -> Result<LoginOutcome, StoreError> {
        self.0.login(login).instrument(call_span()).await
    }

    async fn find_access(&self, hash: &TokenHash) -> Result<Option<AccessRecord>, StoreError> {
        self.0.find_access(hash).instrument(call_span()).await
    }

    async fn refresh_session(
        &self,
        hash: &TokenHash,
        now: Millis,
    ) -> Result<Option<(String, bool)>, StoreError> {
        self.0
            .refresh_session(hash, now)
            .instrument(call_span())
            .await
    }

    async fn touch(
        &self,
        session_id: &str,
        now: Millis,
        min_interval: Millis,
    ) -> Result<(), StoreError> {
        self.0
            .touch(session_id, now, min_interval)
            .instrument(call_span())
            .await
    }

    async fn rotate(&self, rotation: Rotation) -> Result<RotateOutcome, StoreError> {
        self.0.rotate(rotation).instrument(call_span()).await
    }

    async fn end_sessions(
        &self,
        target: EndTarget<'_>,
        reason: EndReason,
        now: Millis,
    ) -> Result<Vec<String>, StoreError> {
        self.0
            .end_sessions(target, reason, now)
            .instrument(call_span())
            .await
    }

    async fn list_sessions(
        &self,
        openid: &str,
        now: Millis,
    ) -> Result<Vec<SessionInfo>, StoreError> {
        self.0
            .list_sessions(openid, now)
            .instrument(call_span())
            .await
    }

    async fn user_exists(&self, openid: &str) -> Result<bool, StoreError> {
        self.0.user_exists(openid).instrument(call_span()).await
    }

    async fn list_events(
        &self,
        openid: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        self.0
            .list_events(openid, before, limit)
            .instrument(call_span())
            .await
    }

    async fn expire_sessions(&self, openid: Option<&str>, now: Millis) -> Result<u32, StoreError> {
        self.0
            .expire_sessions(openid, now)
            .instrument(call_span())
            .await
    }

    async fn purge(
        &self,
        now: Millis,
        keep: Millis,
        grace: Millis,
        batch: u32,
    ) -> Result<u64, StoreError> {
        self.0
            .purge(now, keep, grace, batch)
            .instrument(call_span())
            .await
    }

    async fn forget(&self, before: Millis, batch: u32) -> Result<(u64, u64), StoreError> {
        self.0.forget(before, batch).instrument(call_span()).await
    }

    async fn session_keys(&self, openid: &str) -> Result<Option<SealedSessionKeys>, StoreError> {
        self.0.session_keys(openid).instrument(call_span()).await
    }

    async fn set_phone(
        &self,
        openid: &str,
        sealed: &[u8],
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.0
            .set_phone(openid, sealed, now)
            .instrument(call_span())
            .await
    }

    async fn phone(&self, openid: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.phone(openid).instrument(call_span()).await
    }

    async fn app_token(&self, appid: &str) -> Result<Option<StoredAppToken>, StoreError> {
        self.0.app_token(appid).instrument(call_span()).await
    }

    async fn lock_app_token(&self, appid: &str) -> Result<Box<dyn AppTokenLock>, StoreError> {
        let lock = self.0.lock_app_token(appid).instrument(call_span()).await?;
        Ok(Box::new(CallSpanned(lock)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().instrument(call_span()).await
    }

    async fn ready(&self) {
        self.0.ready().await;
    }
}

#[async_trait]
impl AppTokenLock for CallSpanned<Box<dyn AppTokenLock>> {
    fn current(&self) -> Option<&StoredAppToken> {
        self.0.current()
    }

    async fn replace(
        self: Box<Self>,
        sealed: Vec<u8>,
        expires_at: Millis,
        now: Millis,
    ) -> Result<StoredAppToken, StoreError> {
        self.0
            .replace(sealed, expires_at, now)
            .instrument(call_span())
            .await
    }

    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        self.0.release().instrument(call_span()).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use shared::telemetry::{Call, in_call};

    use super::*;
    use crate::store::sqlite::SqliteStore;

    /// A sink that keeps every line written to it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn what_sqlx_logs_on_its_sqlite_thread_carries_the_call() {
        // Arrange: sqlx logs every statement at debug, on its worker thread, in the span
        // that was current when the statement was sent. That thread sees only the global
        // subscriber (no other test in this binary sets one).
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter("info,sqlx=debug")
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        let dir = tempfile::tempdir().expect("dir");
        let store = CallSpanned(
            SqliteStore::open(&dir.path().join("a.db"))
                .await
                .expect("open"),
        );

        // Act: a plain operation, and the app token's lock taken and used in another call
        let call = Call::new("/wxauth.v1.AuthService/Verify", "req-on-sqlite");
        in_call(call, store.ping()).await.expect("ping");
        let call = Call::new("/wxauth.v1.AuthService/GetWechatAccessToken", "req-lock");
        let lock = in_call(call.clone(), store.lock_app_token("wx-test"))
            .await
            .expect("locked");
        in_call(call, lock.replace(vec![1, 2, 3], 2_000, 1_000))
            .await
            .expect("replaced");

        // Assert: the statement's line names the call
        let text = String::from_utf8(out.0.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .expect("utf-8");
        let carried = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["target"] == "sqlx::query")
            .any(|l| l["span"]["request_id"] == "req-on-sqlite");
        assert!(carried, "no sqlx line with the call's request id:\n{text}");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let written = lines
            .iter()
            .rfind(|l| {
                l["target"] == "sqlx::query"
                    && l["fields"]["db.statement"]
                        .as_str()
                        .is_some_and(|q| q.contains("INSERT INTO wechat_access_tokens"))
            })
            .unwrap_or_else(|| panic!("no line of the lock's write:\n{text}"));
        assert_eq!(written["span"]["request_id"], "req-lock", "{written}");
    }
}
