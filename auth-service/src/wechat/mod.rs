//! The client of WeChat's server API (`WECHAT_API_BASE`), over reqwest with rustls.
//!
//! Answers are parsed as JSON whatever their Content-Type says (jscode2session answers
//! `text/plain`). Nothing here logs a URL: it carries the app secret and the user's code,
//! so reqwest errors are stripped of their URL before they travel anywhere.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::WechatSettings;
use crate::domain::WechatCode;
use crate::error::WechatErr;

/// What jscode2session gives for a valid code.
#[derive(Clone)]
pub struct Code2Session {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, when the app is bound to an Open Platform account.
    pub unionid: Option<String>,
    /// The 16-byte session_key (decoded from base64). Never log it.
    pub session_key: SessionKey,
}

impl std::fmt::Debug for Code2Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Code2Session")
            .field("openid", &self.openid)
            .field("unionid", &self.unionid)
            .finish_non_exhaustive()
    }
}

/// A WeChat session_key: 16 bytes, kept only encrypted at rest.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 16]);

impl SessionKey {
    /// Decodes WeChat's base64 form; anything but 16 bytes is refused.
    pub fn from_base64(raw: &str) -> Option<Self> {
        let bytes = STANDARD.decode(raw).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// Rebuilds a key from its stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// The raw key. Never log it.
    pub fn expose(&self) -> &[u8; 16] {
        &self.0
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Why a call to WeChat failed.
#[derive(Debug, thiserror::Error)]
pub enum WechatCallError {
    /// WeChat answered with a non-zero errcode.
    #[error("WeChat errcode {}", .0.errcode)]
    Api(WechatErr),
    /// No answer in time, or no connection.
    #[error("WeChat unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    /// An answer that is not what WeChat's API documents.
    #[error("malformed answer from WeChat: {0}")]
    Malformed(String),
}

/// The WeChat server API client.
#[derive(Clone)]
pub struct WechatClient {
    http: reqwest::Client,
    base: reqwest::Url,
    appid: String,
    secret: SecretString,
}

impl std::fmt::Debug for WechatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatClient")
            .field("base", &self.base.as_str())
            .field("appid", &self.appid)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawAnswer {
    #[serde(default)]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    openid: Option<String>,
    #[serde(default)]
    unionid: Option<String>,
    #[serde(default)]
    session_key: Option<String>,
}

impl WechatClient {
    /// A client whose every call is bounded by `settings.timeout`.
    pub fn new(settings: &WechatSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(3)))
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("wxauth/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: settings.api_base.clone(),
            appid: settings.appid.clone(),
            secret: settings.secret.clone(),
        })
    }

    /// The app's appid.
    pub fn appid(&self) -> &str {
        &self.appid
    }

    /// One call of `GET /sns/jscode2session` (no retry here: the caller decides).
    pub async fn code2session(&self, code: &WechatCode) -> Result<Code2Session, WechatCallError> {
        let mut url = self
            .base
            .join("sns/jscode2session")
            .map_err(|_| WechatCallError::Malformed("bad WECHAT_API_BASE".into()))?;
        url.query_pairs_mut()
            .append_pair("appid", &self.appid)
            .append_pair("secret", self.secret.expose_secret())
            .append_pair("js_code", code.as_ref())
            .append_pair("grant_type", "authorization_code");
        let body = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| WechatCallError::Unreachable(e.without_url()))?
            .bytes()
            .await
            .map_err(|e| WechatCallError::Unreachable(e.without_url()))?;
        let raw: RawAnswer = serde_json::from_slice(&body)
            .map_err(|e| WechatCallError::Malformed(format!("not JSON ({e})")))?;
        if let Some(errcode) = raw.errcode.filter(|c| *c != 0) {
            return Err(WechatCallError::Api(WechatErr {
                errcode,
                errmsg: raw.errmsg.unwrap_or_default(),
            }));
        }
        let openid = raw
            .openid
            .filter(|o| !o.is_empty() && o.len() <= 128)
            .ok_or_else(|| WechatCallError::Malformed("no openid".into()))?;
        let session_key = raw
            .session_key
            .as_deref()
            .and_then(SessionKey::from_base64)
            .ok_or_else(|| WechatCallError::Malformed("no valid session_key".into()))?;
        Ok(Code2Session {
            openid,
            unionid: raw.unionid.filter(|u| !u.is_empty()),
            session_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_are_16_bytes_of_base64() {
        assert!(SessionKey::from_base64("tiihtNczf5v6AKRyjwEUhQ==").is_some());
        assert!(SessionKey::from_base64("dGlueQ==").is_none());
        assert!(SessionKey::from_base64("not base64!").is_none());
        let k = SessionKey::from_base64("tiihtNczf5v6AKRyjwEUhQ==").expect("valid");
        assert_eq!(format!("{k:?}"), "SessionKey(..)");
    }
}
