//! Starting the WeChat simulator (`wechat-sim`) and driving it through its control API, as
//! documented in [`crate::sim`].

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
    /// `None`: `jscode2session`.
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

    /// Only for calls of `endpoint` (`"jscode2session"`, ...).
    #[must_use]
    pub fn on_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Only for calls with `code`.
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
