//! A stand-in for auth-service in unit tests: every token is valid and names the user
//! `openid-<token>`, every user has the same phone number (or none), and every call is
//! recorded so that a test can count the round trips a route makes.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    AuthApi, AuthResult, CallContext, Device, Identity, PhoneNumber, SessionItem, TokenPair,
};
use crate::error::ApiError;

/// One call the edge made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// `Verify`, with its `include_phone`.
    Verify { include_phone: bool },
    /// `GetPhoneNumber`, with its code.
    PhoneNumber { code: String },
    /// Any other RPC, by name.
    Other(&'static str),
}

/// The fake.
#[derive(Debug, Default)]
pub(crate) struct FakeAuth {
    /// The kept phone number of every user.
    phone: Option<PhoneNumber>,
    calls: Mutex<Vec<Call>>,
}

impl FakeAuth {
    /// Every user has `number` (a mainland China number).
    pub(crate) fn with_phone(number: &str) -> Self {
        Self {
            phone: Some(PhoneNumber {
                phone_number: number.to_owned(),
                pure_phone_number: number.to_owned(),
                country_code: "86".to_owned(),
            }),
            calls: Mutex::default(),
        }
    }

    /// The calls made since the last look, oldest first.
    pub(crate) fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    /// Records `rpc` and answers that the fake does not serve it.
    fn unserved<T>(&self, rpc: &'static str) -> AuthResult<T> {
        self.record(Call::Other(rpc));
        Err(ApiError::auth_unavailable(anyhow::anyhow!(
            "the fake auth-service does not answer {rpc}"
        )))
    }
}

#[async_trait]
impl AuthApi for FakeAuth {
    async fn verify(
        &self,
        _ctx: &CallContext,
        access_token: &str,
        include_phone: bool,
    ) -> AuthResult<Identity> {
        self.record(Call::Verify { include_phone });
        Ok(Identity {
            openid: format!("openid-{access_token}"),
            unionid: None,
            session_id: "session-1".to_owned(),
            phone: self.phone.clone().filter(|_| include_phone),
        })
    }

    async fn login(
        &self,
        _ctx: &CallContext,
        _code: &str,
        _device: Option<Device>,
        _client_ip: &str,
    ) -> AuthResult<TokenPair> {
        self.unserved("Login")
    }

    async fn refresh(&self, _ctx: &CallContext, _refresh_token: &str) -> AuthResult<TokenPair> {
        self.unserved("Refresh")
    }

    async fn logout(&self, _ctx: &CallContext, _access_token: &str, _all: bool) -> AuthResult<u32> {
        self.unserved("Logout")
    }

    async fn list_sessions(
        &self,
        _ctx: &CallContext,
        _access_token: &str,
    ) -> AuthResult<Vec<SessionItem>> {
        self.unserved("ListSessions")
    }

    async fn decrypt_data(
        &self,
        _ctx: &CallContext,
        _access_token: &str,
        _encrypted_data: &str,
        _iv: &str,
    ) -> AuthResult<serde_json::Value> {
        self.unserved("DecryptData")
    }

    async fn phone_number(
        &self,
        _ctx: &CallContext,
        _access_token: &str,
        code: &str,
    ) -> AuthResult<Option<PhoneNumber>> {
        self.record(Call::PhoneNumber {
            code: code.to_owned(),
        });
        Ok(self.phone.clone())
    }

    async fn ready(&self) -> bool {
        self.record(Call::Other("Health/Check"));
        // Pending once, as a real call is: the requests that come meanwhile queue behind it.
        tokio::task::yield_now().await;
        true
    }
}
