//! The user's session_key at work: `GET /wxa/checksession` (checkSessionKey), `GET
//! /wxa/resetusersessionkey` (resetUserSessionKey), and the control call `POST /sim/encrypt`,
//! which does what the phone does for encryptedData. The keys themselves live in `users`.

use std::collections::HashMap;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockEncryptMut as _, KeyIvInit as _};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use super::access_token;
use super::control::{ControlError, ControlJson, check_appid, check_id};
use super::ids;
use super::state::{SimState, World};
use super::wechat::{self, Endpoint, Params, WechatError};

/// The only `sig_method` WeChat defines.
const SIG_METHOD: &str = "hmac_sha256";

/// What checksession and resetusersessionkey expect as `signature` for `session_key`:
/// lowercase hex HMAC-SHA256 keyed with the key's base64 text (as ASCII bytes), of the empty
/// message.
pub(crate) fn signature(session_key: &str) -> String {
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

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route("/wxa/checksession", get(checksession))
        .route("/wxa/resetusersessionkey", get(resetusersessionkey))
        .route("/sim/encrypt", post(encrypt))
}

type QueryParams = Result<Query<HashMap<String, String>>, QueryRejection>;

async fn checksession(State(state): State<SimState>, query: QueryParams) -> Response {
    session_call(&state, Endpoint::Checksession, Params::from_query(query)).await
}

async fn resetusersessionkey(State(state): State<SimState>, query: QueryParams) -> Response {
    session_call(
        &state,
        Endpoint::Resetusersessionkey,
        Params::from_query(query),
    )
    .await
}

async fn session_call(state: &SimState, endpoint: Endpoint, params: Params) -> Response {
    if let Some(answer) = wechat::begin_call(state, endpoint, None).await {
        return answer;
    }
    let answer = state.with_world(|world| {
        check_signature(world, &params)?;
        let openid = params.get("openid").unwrap_or_default();
        if endpoint == Endpoint::Checksession {
            return Ok(wechat::ok_body(serde_json::json!({})));
        }
        let user = world
            .users
            .rotate_session_key(openid)?
            .ok_or_else(|| WechatError::new(WechatError::INVALID_OPENID))?;
        tracing::info!(openid, "session_key reset");
        Ok(wechat::ok_body(serde_json::json!({
            "openid": user.openid(),
            "session_key": user.session_key(),
        })))
    });
    wechat::respond(endpoint, answer)
}

/// The checks both calls make, in order: the access_token (41001/40001/42001), the openid
/// (40003 missing or unknown), then `sig_method` and `signature` against the user's current
/// key (87009).
fn check_signature(world: &World, params: &Params) -> Result<(), WechatError> {
    access_token::check(world, params.get("access_token"))?;
    let user = params
        .get("openid")
        .and_then(|openid| world.users.get(openid))
        .ok_or_else(|| WechatError::new(WechatError::INVALID_OPENID))?;
    let expected = signature(user.session_key());
    let matches = params.get("sig_method") == Some(SIG_METHOD)
        && params
            .get("signature")
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())));
    if matches {
        Ok(())
    } else {
        Err(WechatError::new(WechatError::INVALID_SIGNATURE))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptBody {
    openid: Option<String>,
    data: serde_json::Map<String, serde_json::Value>,
    session_key: Option<String>,
    appid: Option<String>,
}

#[derive(Debug, Serialize)]
struct EncryptAnswer {
    encrypted_data: String,
    iv: String,
}

/// A session_key as AES wants it: the 16 bytes its base64 stands for.
fn key_bytes(session_key: &str) -> Option<[u8; 16]> {
    STANDARD.decode(session_key).ok()?.try_into().ok()
}

/// The compact JSON of `data` with `"watermark":{"timestamp":…,"appid":"…"}` as its last field,
/// as the phone writes it.
fn plaintext(
    data: &serde_json::Map<String, serde_json::Value>,
    timestamp: u64,
    appid: &str,
) -> String {
    let watermark = format!(
        r#""watermark":{{"timestamp":{timestamp},"appid":{}}}"#,
        serde_json::Value::from(appid)
    );
    let data = serde_json::Value::Object(data.clone()).to_string();
    let fields = data
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_default();
    if fields.is_empty() {
        format!("{{{watermark}}}")
    } else {
        format!("{{{fields},{watermark}}}")
    }
}

/// AES-128-CBC with PKCS#7 padding, as encryptedData is made.
fn encrypt_cbc(key: &[u8; 16], iv: &[u8; 16], plaintext: &[u8]) -> Vec<u8> {
    cbc::Encryptor::<aes::Aes128>::new(key.into(), iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext)
}

async fn encrypt(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<EncryptBody>,
) -> Result<Json<EncryptAnswer>, ControlError> {
    if body.data.contains_key("watermark") {
        return Err(ControlError::bad_request(
            "data must not have a watermark: the simulator appends it (give appid to change it)",
        ));
    }
    let appid = match body.appid {
        Some(appid) => check_appid(appid)?,
        None => state.settings().appid.clone(),
    };
    let openid = body.openid.map(|id| check_id("openid", id)).transpose()?;
    let given_key = body
        .session_key
        .map(|key| {
            key_bytes(&key).ok_or_else(|| {
                ControlError::bad_request("session_key must be the base64 of 16 bytes")
            })
        })
        .transpose()?;
    let (key, timestamp) = state.with_world(|world| {
        let key = match given_key {
            Some(key) => key,
            None => {
                let openid = openid.as_deref().ok_or_else(|| {
                    ControlError::bad_request("give openid, session_key, or both")
                })?;
                let user = world.users.get(openid).ok_or_else(|| {
                    ControlError::NotFound(format!("no user with openid {openid:?}"))
                })?;
                key_bytes(user.session_key()).ok_or_else(|| {
                    ControlError::bad_request("the user's session_key is not 16 bytes of base64")
                })?
            }
        };
        Ok::<_, ControlError>((key, world.clock.unix_now()))
    })?;
    let iv = ids::random_bytes::<16>()?;
    let ciphertext = encrypt_cbc(
        &key,
        &iv,
        plaintext(&body.data, timestamp, &appid).as_bytes(),
    );
    tracing::info!(openid = openid.as_deref(), %appid, "data encrypted");
    Ok(Json(EncryptAnswer {
        encrypted_data: STANDARD.encode(ciphertext),
        iv: STANDARD.encode(iv),
    }))
}

#[cfg(test)]
mod tests {
    use aes::cipher::BlockDecryptMut as _;

    use super::*;

    /// WeChat's published test vector (its "signature" documentation and sample code).
    const SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const ENCRYPTED_DATA: &str = concat!(
        "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS",
        "9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142d",
        "NCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6",
        "/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn",
        "/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4P",
        "C7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns",
        "/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYV",
        "oKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuy",
        "Db/XcxxmK01EpqOyuxINew==",
    );

    fn decrypt(key: &[u8; 16], iv: &[u8; 16], ciphertext: &[u8]) -> Vec<u8> {
        cbc::Decryptor::<aes::Aes128>::new(key.into(), iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
            .expect("valid padding")
    }

    #[test]
    fn encryption_matches_wechats_test_vector() {
        let key = key_bytes(SESSION_KEY).expect("16 bytes");
        let iv = key_bytes(IV).expect("16 bytes");
        let ciphertext = STANDARD.decode(ENCRYPTED_DATA).expect("base64");
        let plain = decrypt(&key, &iv, &ciphertext);
        let json: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
        assert_eq!(json["watermark"]["appid"], "wx4f4bc4dec97d474b");

        assert_eq!(encrypt_cbc(&key, &iv, &plain), ciphertext);
    }

    #[test]
    fn the_watermark_is_the_last_field() {
        let data = serde_json::json!({"stepInfoList": [{"step": 100}], "openGId": "g\"1"});
        let data = data.as_object().expect("an object");
        let text = plaintext(data, 1_700_000_000, "wxapp");
        assert!(
            text.ends_with(r#","watermark":{"timestamp":1700000000,"appid":"wxapp"}}"#),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(json["openGId"], "g\"1");
        assert_eq!(
            plaintext(&serde_json::Map::new(), 5, "wx1"),
            r#"{"watermark":{"timestamp":5,"appid":"wx1"}}"#
        );
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256_of_nothing_keyed_with_the_key_text() {
        assert_eq!(
            signature(SESSION_KEY),
            "7154f9f8b4b76b92f541cbf0e37d48840fa06e5e42da92a6f80168a1516a4735"
        );
    }

    #[test]
    fn a_key_is_16_bytes_of_base64() {
        assert!(key_bytes(SESSION_KEY).is_some());
        assert!(key_bytes("AAAA").is_none());
        assert!(key_bytes("not base64!").is_none());
    }
}
