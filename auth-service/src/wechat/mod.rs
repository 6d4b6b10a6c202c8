//! The client of WeChat's server API (`WECHAT_API_BASE`), over reqwest with rustls:
//! jscode2session (login), stable_token (the app's access_token) and getuserphonenumber.
//! [`crypto`] decrypts encryptedData; [`access_token`] owns the app's access_token.
//!
//! Answers are parsed as JSON whatever their Content-Type says (jscode2session answers
//! `text/plain`). Nothing here logs a URL: it carries the app secret, the user's code or the
//! access_token, so reqwest errors are stripped of their URL before they travel anywhere.

pub mod access_token;
pub mod crypto;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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

/// The app's access_token as stable_token answered it.
pub struct AppAccessToken {
    /// The token (WeChat asks for room for 512 characters; up to 2048 are taken). Never log
    /// it.
    pub token: SecretString,
    /// How long WeChat says it stays valid.
    pub expires_in: Duration,
}

impl std::fmt::Debug for AppAccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppAccessToken")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// A user's phone number, as getuserphonenumber answers it (and as it is kept, sealed).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneNumber {
    /// With the country code for numbers outside China (WeChat's `phoneNumber`).
    pub phone_number: String,
    /// Without country code (`purePhoneNumber`).
    pub pure_phone_number: String,
    /// The country calling code without `+` (`countryCode`, a string or a number on the wire).
    pub country_code: String,
}

// A phone number is personal data: it stays out of Debug output.
impl std::fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhoneNumber(..)")
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

/// `errcode`/`errmsg`, present on every error answer (and on some successes, as 0).
#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
}

/// stable_token's success.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// getuserphonenumber's success.
#[derive(Deserialize)]
struct PhoneAnswer {
    phone_info: RawPhoneInfo,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPhoneInfo {
    phone_number: String,
    pure_phone_number: String,
    /// Documented as a string, shown as a number: both are taken.
    country_code: serde_json::Value,
}

/// The longest access_token accepted (WeChat asks for room for 512 characters).
const MAX_ACCESS_TOKEN_LEN: usize = 2048;

/// WeChat's `countryCode`, from a string (`"86"`) or a number (`86`).
fn country_code(raw: &serde_json::Value) -> Option<String> {
    let code = match raw {
        serde_json::Value::String(s) => s.trim().trim_start_matches('+').to_owned(),
        serde_json::Value::Number(n) => n.as_u64()?.to_string(),
        _ => return None,
    };
    (!code.is_empty() && code.len() <= 8 && code.bytes().all(|b| b.is_ascii_digit()))
        .then_some(code)
}

/// Turns an answer's body into `T`, or into WeChat's error when it carries a non-zero
/// errcode. Malformed answers say what is wrong, never what they held.
fn parse_answer<T: DeserializeOwned>(body: &[u8]) -> Result<T, WechatCallError> {
    let value: serde_json::Value = from_body(body)?;
    let status: Status = deserialize(&value)?;
    if let Some(errcode) = status.errcode.filter(|c| *c != 0) {
        return Err(WechatCallError::Api(WechatErr {
            errcode,
            errmsg: status.errmsg.unwrap_or_default(),
        }));
    }
    deserialize(&value)
}

/// An answer's body as one JSON value of type `T`, nothing after it.
fn from_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WechatCallError> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let value = deserialize(&mut json)?;
    json.end()
        .map_err(|_| WechatCallError::Malformed("more than one JSON value".into()))?;
    Ok(value)
}

/// Deserializes a WeChat answer; a failure says where, and what was wrong, never the value:
/// serde's own message quotes a value of the wrong type (``invalid type: integer
/// `13800138000`, expected a string``), which may be a phone number or a session_key, and
/// these errors are logged.
fn deserialize<'de, T: Deserialize<'de>>(
    from: impl serde::Deserializer<'de, Error = serde_json::Error>,
) -> Result<T, WechatCallError> {
    use serde_json::error::Category;
    serde_path_to_error::deserialize(from).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let why = match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                format!(
                    "not JSON (line {}, column {})",
                    inner.line(),
                    inner.column()
                )
            }
            // "missing field `openid`" names a field, nothing it held.
            Category::Data if inner.to_string().starts_with("missing field") => {
                format!("{inner} at {path}")
            }
            Category::Data => format!("{path} has the wrong type or value"),
        };
        WechatCallError::Malformed(why)
    })
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
            .map_err(|e| WechatCallError::Unreachable(e.without_url()))?;
        let body = read_answer(body).await?;
        let raw: RawAnswer = from_body(&body)?;
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

    /// One call of `POST /cgi-bin/stable_token`. `force_refresh: false` answers the current
    /// token while it is valid; `true` ends it at once and makes a new one (20 a day).
    pub async fn stable_token(
        &self,
        force_refresh: bool,
    ) -> Result<AppAccessToken, WechatCallError> {
        let url = self
            .base
            .join("cgi-bin/stable_token")
            .map_err(|_| WechatCallError::Malformed("bad WECHAT_API_BASE".into()))?;
        let body = serde_json::json!({
            "grant_type": "client_credential",
            "appid": self.appid,
            "secret": self.secret.expose_secret(),
            "force_refresh": force_refresh,
        });
        let answer: TokenAnswer = parse_answer(&self.post_json(url, &body).await?)?;
        if answer.access_token.is_empty() || answer.access_token.len() > MAX_ACCESS_TOKEN_LEN {
            return Err(WechatCallError::Malformed(
                "access_token empty or too long".into(),
            ));
        }
        if answer.expires_in == 0 {
            return Err(WechatCallError::Malformed("expires_in is 0".into()));
        }
        Ok(AppAccessToken {
            token: SecretString::from(answer.access_token),
            expires_in: Duration::from_secs(answer.expires_in),
        })
    }

    /// One call of `POST /wxa/business/getuserphonenumber` with the app's `access_token`:
    /// exchanges a getPhoneNumber button's code (billed by WeChat on success). `openid` (the
    /// documented optional field) makes WeChat check that the code is that user's, so a code
    /// cannot attach one user's number to another's account.
    pub async fn phone_number(
        &self,
        access_token: &SecretString,
        code: &WechatCode,
        openid: &str,
    ) -> Result<PhoneNumber, WechatCallError> {
        let mut url = self
            .base
            .join("wxa/business/getuserphonenumber")
            .map_err(|_| WechatCallError::Malformed("bad WECHAT_API_BASE".into()))?;
        url.query_pairs_mut()
            .append_pair("access_token", access_token.expose_secret());
        let body = serde_json::json!({ "code": code.as_ref(), "openid": openid });
        let answer: PhoneAnswer = parse_answer(&self.post_json(url, &body).await?)?;
        let info = answer.phone_info;
        let country_code = country_code(&info.country_code)
            .ok_or_else(|| WechatCallError::Malformed("countryCode is not a number".into()))?;
        if info.phone_number.is_empty() || info.pure_phone_number.is_empty() {
            return Err(WechatCallError::Malformed("empty phone number".into()));
        }
        Ok(PhoneNumber {
            phone_number: info.phone_number,
            pure_phone_number: info.pure_phone_number,
            country_code,
        })
    }

    /// POSTs `body` as JSON and reads the whole answer, whatever its status and type.
    async fn post_json(
        &self,
        url: reqwest::Url,
        body: &serde_json::Value,
    ) -> Result<Vec<u8>, WechatCallError> {
        let answer = self
            .http
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| WechatCallError::Unreachable(e.without_url()))?;
        read_answer(answer).await
    }
}

/// The most of an answer read from WeChat: its answers are a few hundred bytes; a larger one
/// (a misconfigured `WECHAT_API_BASE`, a proxy's error page) is malformed, not held whole in
/// memory.
const MAX_ANSWER: usize = 64 * 1024;

/// Reads `response`'s body, at most [`MAX_ANSWER`] bytes.
async fn read_answer(mut response: reqwest::Response) -> Result<Vec<u8>, WechatCallError> {
    let too_long = || WechatCallError::Malformed(format!("an answer over {MAX_ANSWER} bytes"));
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| WechatCallError::Unreachable(e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers one HTTP request on a loopback port with `head` (status line and headers,
    /// without the blank line) and a body of `len` bytes; gives the base URL.
    async fn one_answer(head: &'static str, len: usize) -> reqwest::Url {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = [0_u8; 4096];
            let _ = socket.read(&mut request).await;
            let mut answer = format!("{head}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + len, b'x');
            let _ = socket.write_all(&answer).await;
        });
        reqwest::Url::parse(&format!("http://{addr}/")).expect("url")
    }

    fn client_of(api_base: reqwest::Url) -> WechatClient {
        let _already = rustls::crypto::ring::default_provider().install_default();
        WechatClient::new(&crate::config::WechatSettings {
            appid: "wx1234567890abcdef".into(),
            secret: SecretString::from("s3cr3t-value"),
            api_base,
            timeout: Duration::from_secs(5),
        })
        .expect("client")
    }

    #[tokio::test]
    async fn an_answer_over_64_kib_is_malformed_and_not_read_whole() {
        let code = WechatCode::parse("0a1b2c3d4e5f").expect("a code");
        for head in [
            // Announced by its length, and sent without one (read until the connection ends).
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 70000",
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close",
        ] {
            let wechat = client_of(one_answer(head, 70_000).await);
            let answer = wechat.code2session(&code).await;
            assert!(
                matches!(&answer, Err(WechatCallError::Malformed(why)) if why.contains("65536")),
                "{head}: {answer:?}"
            );
        }
    }

    #[test]
    fn session_keys_are_16_bytes_of_base64() {
        assert!(SessionKey::from_base64("tiihtNczf5v6AKRyjwEUhQ==").is_some());
        assert!(SessionKey::from_base64("dGlueQ==").is_none());
        assert!(SessionKey::from_base64("not base64!").is_none());
        let k = SessionKey::from_base64("tiihtNczf5v6AKRyjwEUhQ==").expect("valid");
        assert_eq!(format!("{k:?}"), "SessionKey(..)");
    }

    #[test]
    fn country_codes_come_as_strings_or_numbers() {
        use serde_json::json;
        for (raw, want) in [
            (json!("86"), Some("86")),
            (json!(86), Some("86")),
            (json!("+1"), Some("1")),
            (json!(" 852 "), Some("852")),
            (json!(1), Some("1")),
            (json!(""), None),
            (json!("eighty-six"), None),
            (json!(-86), None),
            (json!(8.6), None),
            (json!(null), None),
            (json!([86]), None),
        ] {
            assert_eq!(country_code(&raw).as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn phone_answers_parse_with_either_country_code_form() {
        for body in [
            r#"{"errcode":0,"errmsg":"ok","phone_info":{"phoneNumber":"13800138000","purePhoneNumber":"13800138000","countryCode":"86","watermark":{"timestamp":1,"appid":"wx"}}}"#,
            r#"{"phone_info":{"phoneNumber":"13800138000","purePhoneNumber":"13800138000","countryCode":86}}"#,
        ] {
            let answer: PhoneAnswer = parse_answer(body.as_bytes()).expect(body);
            assert_eq!(answer.phone_info.phone_number, "13800138000");
            assert_eq!(
                country_code(&answer.phone_info.country_code).as_deref(),
                Some("86")
            );
        }
    }

    #[test]
    fn errors_are_told_from_malformed_answers() {
        let err =
            parse_answer::<PhoneAnswer>(br#"{"errcode":40029,"errmsg":"invalid code, rid: x"}"#)
                .err();
        assert!(
            matches!(err, Some(WechatCallError::Api(ref e)) if e.errcode == 40029 && e.errmsg == "invalid code, rid: x"),
            "{err:?}"
        );
        for body in [&b"<html>"[..], br#"{"errcode":0}"#, br#"{"errcode":"x"}"#] {
            assert!(
                matches!(
                    parse_answer::<TokenAnswer>(body),
                    Err(WechatCallError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let ok: TokenAnswer =
            parse_answer(br#"{"access_token":"AT","expires_in":7200}"#).expect("a token");
        assert_eq!((ok.access_token.as_str(), ok.expires_in), ("AT", 7200));
    }

    #[test]
    fn malformed_answers_name_the_field_never_its_value() {
        let number = br#"{"phone_info":{"phoneNumber":13800138000,"purePhoneNumber":"1","countryCode":"86"}}"#;
        let Err(WechatCallError::Malformed(why)) = parse_answer::<PhoneAnswer>(number) else {
            panic!("a number where a string belongs is malformed");
        };
        assert!(!why.contains("13800138000"), "{why}");
        assert!(why.contains("phone_info.phoneNumber"), "{why}");

        let Err(WechatCallError::Malformed(why)) = parse_answer::<PhoneAnswer>(br#"{"errcode":0}"#)
        else {
            panic!("no phone_info is malformed");
        };
        assert!(why.contains("missing field `phone_info`"), "{why}");

        for (body, secret) in [
            (
                &br#"{"openid":"o","session_key":1234567890123}"#[..],
                "1234567890123",
            ),
            (br#"{"openid":"o","session_key":"a2V5"} {"x":1}"#, "a2V5"),
            (br#"{"openid":["o-secret"]}"#, "o-secret"),
        ] {
            let Err(WechatCallError::Malformed(why)) = from_body::<RawAnswer>(body) else {
                panic!("{} is malformed", String::from_utf8_lossy(body));
            };
            assert!(!why.contains(secret), "{why}");
        }
    }

    #[test]
    fn debug_output_hides_tokens_and_numbers() {
        let t = AppAccessToken {
            token: SecretString::from("ACCESS-TOKEN-VALUE".to_owned()),
            expires_in: Duration::from_secs(7200),
        };
        assert!(!format!("{t:?}").contains("ACCESS-TOKEN-VALUE"));
        let p = PhoneNumber {
            phone_number: "13800138000".into(),
            pure_phone_number: "13800138000".into(),
            country_code: "86".into(),
        };
        assert!(!format!("{p:?}").contains("138"));
    }
}
