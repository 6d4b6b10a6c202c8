//! Starting the WeChat simulator (`wechat-sim`) and driving it through its control API, as
//! documented in [`crate::sim`].

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use hmac::{Hmac, Mac};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::process::Process;

/// The appid the test simulators know (`WECHAT_SIM_APPID`).
pub const APPID: &str = "wx5e1e2e0000000001";
/// Its secret (`WECHAT_SIM_SECRET`).
pub const SECRET: &str = "00112233445566778899aabbccddeeff";

/// Installs rustls' ring crypto provider for the process, once; reqwest needs one before any
/// client is built. Calling it again does nothing.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is all that is asked.
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
}

/// The `signature` checksession and resetusersessionkey expect for `session_key`: lowercase hex
/// HMAC-SHA256 keyed with the key's base64 text, of the empty message.
pub fn session_key_signature(session_key: &str) -> String {
    // HMAC takes a key of any length: this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(session_key.as_bytes())
        .map(|mac| {
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

/// An HTTP client for tests: the crypto provider installed, no proxy, a `timeout` per request.
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .context("cannot build an HTTP client")
}

/// A running `wechat-sim`, killed when dropped.
#[derive(Debug)]
pub struct SimProcess {
    process: Process,
    base_url: Url,
    client: reqwest::Client,
}

/// `POST /sim/login-codes`: what `wx.login()` does. The default mints a code for a new user
/// without unionid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MintCode {
    /// The user to log in (created when unknown); `None`: a new user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
    /// Sets the user's unionid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    /// Gives the user a random unionid unless it has one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub with_unionid: bool,
    /// Mints the code for another app; `None`: the simulator's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    /// A known user keeps its session_key (no rotation at this login).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_session_key: bool,
}

impl MintCode {
    /// A code for the user `openid` (created when unknown).
    pub fn for_openid(openid: impl Into<String>) -> Self {
        Self {
            openid: Some(openid.into()),
            ..Self::default()
        }
    }
}

/// A minted login code and the user's session as it now is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedCode {
    pub code: String,
    pub openid: String,
    pub unionid: Option<String>,
    /// The user's new current session_key.
    pub session_key: String,
}

/// `GET /sim/users/{openid}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUser {
    pub openid: String,
    pub unionid: Option<String>,
    pub session_key: String,
    /// Newest first.
    pub previous_session_keys: Vec<String>,
}

/// `POST /sim/faults`: how a WeChat endpoint misbehaves. Build one with [`Fault::error`],
/// [`Fault::delay`], [`Fault::hang`] or [`Fault::drop_connection`], then narrow it with
/// [`Fault::for_code`], [`Fault::once`] or [`Fault::limited_to`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fault {
    /// `jscode2session`, `stable_token`, `token`, `getuserphonenumber`, `checksession` or
    /// `resetusersessionkey`; `None`: `jscode2session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Only calls with this code; `None`: every call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Answer this errcode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errcode: Option<i64>,
    /// Answered exactly as it is; `None`: WeChat's text for `errcode` and a rid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errmsg: Option<String>,
    /// Wait this long before answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hang: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drop_after: bool,
    /// `None`: every matching call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
}

impl Fault {
    /// Answer `errcode` (with WeChat's text for it).
    pub fn error(errcode: i64) -> Self {
        Self {
            errcode: Some(errcode),
            ..Self::default()
        }
    }

    /// Answer normally, but not before `ms` milliseconds.
    pub fn delay(ms: u64) -> Self {
        Self {
            delay_ms: Some(ms),
            ..Self::default()
        }
    }

    /// Never answer.
    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// Close the connection without answering.
    pub fn drop_connection() -> Self {
        Self {
            drop: true,
            ..Self::default()
        }
    }

    /// Process the call (a code used, a number billed), then close the connection without
    /// answering.
    pub fn drop_after_processing() -> Self {
        Self {
            drop_after: true,
            ..Self::default()
        }
    }

    /// Only for calls of `endpoint` (`"jscode2session"`, `"stable_token"`, ...).
    #[must_use]
    pub fn on_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Only for calls with `code` (a `js_code`, or a getuserphonenumber `code`).
    #[must_use]
    pub fn for_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Only for the next matching call.
    #[must_use]
    pub fn once(self) -> Self {
        self.limited_to(1)
    }

    /// Only for the next `times` matching calls.
    #[must_use]
    pub fn limited_to(mut self, times: u32) -> Self {
        self.times = Some(times);
        self
    }
}

/// `POST /sim/phone-codes`: what `<button open-type="getPhoneNumber">` does. Build one with
/// [`MintPhoneCode::new`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintPhoneCode {
    /// The number without country code, 4 to 20 digits.
    pub phone_number: String,
    /// 1 to 4 digits without `+`; `None`: `"86"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country_code: Option<String>,
    /// The user the code belongs to (getuserphonenumber with another `openid` gives 40029);
    /// `None`: a user nobody named, so getuserphonenumber gives 40029 for every `openid` and
    /// redeems the code only without one (auth-service always sends its user's openid: name
    /// the owner for codes it is to redeem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
}

impl MintPhoneCode {
    /// A code for `phone_number` (a Chinese number unless [`MintPhoneCode::country_code`]).
    pub fn new(phone_number: impl Into<String>) -> Self {
        Self {
            phone_number: phone_number.into(),
            ..Self::default()
        }
    }

    /// The code belongs to `openid`.
    #[must_use]
    pub fn for_openid(mut self, openid: impl Into<String>) -> Self {
        self.openid = Some(openid.into());
        self
    }

    /// A number of the country `country_code` (`"852"`, ...).
    #[must_use]
    pub fn country_code(mut self, country_code: impl Into<String>) -> Self {
        self.country_code = Some(country_code.into());
        self
    }
}

/// `POST /sim/encrypt`: what the phone does for encryptedData. Build one with
/// [`Encrypt::for_openid`] or [`Encrypt::with_session_key`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encrypt {
    /// Whose current session_key encrypts, unless `session_key` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
    /// A JSON object; the simulator appends the watermark as its last field.
    pub data: serde_json::Value,
    /// Encrypt with this key (base64 of 16 bytes) instead of the user's current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<String>,
    /// The watermark's appid; `None`: the simulator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
}

impl Encrypt {
    /// `data` encrypted with the current session_key of `openid`.
    pub fn for_openid(openid: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            openid: Some(openid.into()),
            data,
            ..Self::default()
        }
    }

    /// `data` encrypted with `session_key` (an older key of a user, say).
    pub fn with_session_key(session_key: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            session_key: Some(session_key.into()),
            data,
            ..Self::default()
        }
    }

    /// Watermarked with `appid` instead of the simulator's.
    #[must_use]
    pub fn appid(mut self, appid: impl Into<String>) -> Self {
        self.appid = Some(appid.into());
        self
    }
}

/// What `POST /sim/encrypt` answers: what the phone sends the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encrypted {
    /// Base64 of the AES-128-CBC ciphertext.
    pub encrypted_data: String,
    /// Base64 of the 16-byte iv.
    pub iv: String,
}

/// `GET /sim/access-token`. Times are Unix seconds on the simulator's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenState {
    /// The newest stable token (`stable_token`), if it still works.
    pub access_token: Option<String>,
    pub expires_at: Option<u64>,
    pub expires_in: Option<u64>,
    /// The newest classic token (`token`), if it still works.
    pub classic_access_token: Option<String>,
    /// The lifetime of tokens issued from now on.
    pub lifetime_seconds: u64,
    /// Force refreshes within the last 24 hours.
    pub force_refreshes_today: u64,
    /// The simulator's now.
    pub now: u64,
    /// Every token issued, newest first.
    pub tokens: Vec<AccessTokenInfo>,
}

/// One token of [`AccessTokenState::tokens`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenInfo {
    pub access_token: String,
    /// `"stable"` or `"classic"`.
    pub kind: String,
    pub issued_at: u64,
    pub expires_at: u64,
    /// When it was ended early (answers 40001 from then on).
    pub ended_at: Option<u64>,
    /// `"valid"`, `"invalid"` (40001) or `"expired"` (42001).
    pub status: String,
}

/// `GET /sim/calls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calls {
    pub endpoints: HashMap<String, u64>,
    pub codes: HashMap<String, u64>,
}

#[derive(Deserialize)]
struct FaultAdded {
    id: u64,
}

#[derive(Deserialize)]
struct FaultsCleared {
    cleared: u64,
}

#[derive(Deserialize)]
struct ClockAdvanced {
    offset_seconds: u64,
}

#[derive(Deserialize)]
struct CodeMinted {
    code: String,
}

#[derive(Deserialize)]
struct TokensTargeted {
    access_tokens: Vec<String>,
}

#[derive(Deserialize)]
struct StableToken {
    access_token: String,
}

impl SimProcess {
    /// Starts `wechat-sim` on a free port with [`APPID`] and [`SECRET`], and waits until it
    /// listens.
    pub async fn start() -> anyhow::Result<Self> {
        let env = [
            ("WECHAT_SIM_ADDR", "127.0.0.1:0"),
            ("WECHAT_SIM_APPID", APPID),
            ("WECHAT_SIM_SECRET", SECRET),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let mut process = Process::spawn("wechat-sim", &env, &std::env::temp_dir())?;
        let addr = process.wait_for_addr("http").await?;
        let base_url = Url::parse(&format!("http://{addr}"))
            .with_context(|| format!("{addr} does not make a URL"))?;
        Ok(Self {
            process,
            base_url,
            client: http_client(Duration::from_secs(30))?,
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: what `WECHAT_API_BASE` should be.
    pub fn base_url(&self) -> String {
        self.base_url.as_str().trim_end_matches('/').to_owned()
    }

    /// The URL of `path` (`"/sns/jscode2session"`, ...) on the simulator.
    pub fn url(&self, path: &str) -> anyhow::Result<Url> {
        self.base_url
            .join(path)
            .with_context(|| format!("{path} does not make a URL"))
    }

    /// The client the control calls use (30 s timeout).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Mints a login code, rotating the user's session_key.
    pub async fn mint_code(&self, mint: &MintCode) -> anyhow::Result<MintedCode> {
        let body = serde_json::to_value(mint)?;
        self.control(Method::POST, self.url("/sim/login-codes")?, Some(body))
            .await
    }

    /// The user `openid` as the simulator knows it.
    pub async fn user(&self, openid: &str) -> anyhow::Result<SimUser> {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("{} cannot take a path", self.base_url))?
            .clear()
            .extend(["sim", "users", openid]);
        self.control(Method::GET, url, None).await
    }

    /// Stages a fault; answers its id.
    pub async fn add_fault(&self, fault: &Fault) -> anyhow::Result<u64> {
        let body = serde_json::to_value(fault)?;
        let added: FaultAdded = self
            .control(Method::POST, self.url("/sim/faults")?, Some(body))
            .await?;
        Ok(added.id)
    }

    /// Removes every active fault; answers how many there were.
    pub async fn clear_faults(&self) -> anyhow::Result<u64> {
        let cleared: FaultsCleared = self
            .control(Method::DELETE, self.url("/sim/faults")?, None)
            .await?;
        Ok(cleared.cleared)
    }

    /// Call counts per endpoint and per code.
    pub async fn calls(&self) -> anyhow::Result<Calls> {
        self.control(Method::GET, self.url("/sim/calls")?, None)
            .await
    }

    /// How many WeChat calls carried `code`.
    pub async fn code_calls(&self, code: &str) -> anyhow::Result<u64> {
        Ok(self.calls().await?.codes.get(code).copied().unwrap_or(0))
    }

    /// How many calls `endpoint` (`"jscode2session"`, ...) had.
    pub async fn endpoint_calls(&self, endpoint: &str) -> anyhow::Result<u64> {
        Ok(self
            .calls()
            .await?
            .endpoints
            .get(endpoint)
            .copied()
            .unwrap_or(0))
    }

    /// Moves the simulator's clock forward; answers the total advance in seconds.
    pub async fn advance_clock(&self, seconds: u64) -> anyhow::Result<u64> {
        let body = serde_json::json!({ "seconds": seconds });
        let advanced: ClockAdvanced = self
            .control(Method::POST, self.url("/sim/clock/advance")?, Some(body))
            .await?;
        Ok(advanced.offset_seconds)
    }

    /// Mints a phone code; answers it.
    pub async fn mint_phone_code(&self, mint: &MintPhoneCode) -> anyhow::Result<String> {
        let body = serde_json::to_value(mint)?;
        let minted: CodeMinted = self
            .control(Method::POST, self.url("/sim/phone-codes")?, Some(body))
            .await?;
        Ok(minted.code)
    }

    /// Makes getuserphonenumber answer `countryCode` as a JSON number (`true`) or as a string
    /// (`false`, the default).
    pub async fn set_country_code_as_number(&self, as_number: bool) -> anyhow::Result<()> {
        let body = serde_json::json!({ "country_code_as_number": as_number });
        let _: serde_json::Value = self
            .control(
                Method::POST,
                self.url("/sim/phone-number-format")?,
                Some(body),
            )
            .await?;
        Ok(())
    }

    /// Encrypts a JSON object as the phone does for encryptedData.
    pub async fn encrypt(&self, encrypt: &Encrypt) -> anyhow::Result<Encrypted> {
        let body = serde_json::to_value(encrypt)?;
        self.control(Method::POST, self.url("/sim/encrypt")?, Some(body))
            .await
    }

    /// Makes `access_token`, or every token that works now when `None`, answer 40001 from now
    /// on; answers the tokens it applied to.
    pub async fn invalidate_access_token(
        &self,
        access_token: Option<&str>,
    ) -> anyhow::Result<Vec<String>> {
        self.target_access_tokens("/sim/access-token/invalidate", access_token)
            .await
    }

    /// Makes `access_token`, or every token that works now when `None`, answer 42001 from now
    /// on; answers the tokens it applied to.
    pub async fn expire_access_token(
        &self,
        access_token: Option<&str>,
    ) -> anyhow::Result<Vec<String>> {
        self.target_access_tokens("/sim/access-token/expire", access_token)
            .await
    }

    async fn target_access_tokens(
        &self,
        path: &str,
        access_token: Option<&str>,
    ) -> anyhow::Result<Vec<String>> {
        let body = match access_token {
            Some(token) => serde_json::json!({ "access_token": token }),
            None => serde_json::json!({}),
        };
        let targeted: TokensTargeted = self
            .control(Method::POST, self.url(path)?, Some(body))
            .await?;
        Ok(targeted.access_tokens)
    }

    /// Sets the lifetime of the access tokens issued from now on (default 7200 s).
    pub async fn set_access_token_lifetime(&self, seconds: u64) -> anyhow::Result<()> {
        let body = serde_json::json!({ "seconds": seconds });
        let _: serde_json::Value = self
            .control(
                Method::POST,
                self.url("/sim/access-token/lifetime")?,
                Some(body),
            )
            .await?;
        Ok(())
    }

    /// The access tokens as the simulator knows them.
    pub async fn access_token(&self) -> anyhow::Result<AccessTokenState> {
        self.control(Method::GET, self.url("/sim/access-token")?, None)
            .await
    }

    /// Gets a stable access token the way a server does (`POST /cgi-bin/stable_token` with
    /// [`APPID`] and [`SECRET`], `force_refresh: false`): a call of `stable_token` like any other.
    pub async fn fetch_stable_token(&self) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "grant_type": "client_credential",
            "appid": APPID,
            "secret": SECRET,
            "force_refresh": false,
        });
        let token: StableToken = self
            .control(Method::POST, self.url("/cgi-bin/stable_token")?, Some(body))
            .await?;
        Ok(token.access_token)
    }

    /// Forgets users, codes, faults, counts and the clock's advance.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .control(Method::POST, self.url("/sim/reset")?, None)
            .await?;
        Ok(())
    }

    /// Every line the simulator logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }

    /// The process, for tests that stop it.
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// A control call: JSON `body` in, JSON out; any status but 200 is an error that quotes
    /// the simulator's answer.
    async fn control<R: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<R> {
        let what = format!("{method} {}", url.path());
        let mut request = self.client.request(method, url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{what}: no answer from the simulator"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("{what}: cannot read the answer"))?;
        if status != reqwest::StatusCode::OK {
            bail!("{what}: the simulator answered {status}: {text}");
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{what}: unexpected answer from the simulator: {text}"))
    }
}
