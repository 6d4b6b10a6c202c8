//! The phone number: `POST /wxa/business/getuserphonenumber`, and the control calls `POST
//! /sim/phone-codes` (what `<button open-type="getPhoneNumber">` does on the phone) and `POST
//! /sim/phone-number-format`. Owns the phone codes and how `countryCode` is answered.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::access_token;
use super::clock::SimTime;
use super::control::{ControlError, ControlJson, check_id};
use super::ids::{self, RandomError};
use super::state::{SimState, World};
use super::wechat::{self, Endpoint, Params, WechatError};

const ENDPOINT: Endpoint = Endpoint::Getuserphonenumber;
/// How long a phone code can be redeemed after the phone made it.
const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// China's, the default of a minted code.
const DEFAULT_COUNTRY_CODE: &str = "86";

#[derive(Debug)]
struct PhoneCode {
    pure_phone_number: String,
    country_code: String,
    /// The user it belongs to, when the test said; `None`: a user nobody named, whose openid
    /// no call can give (at WeChat every code is some user's).
    openid: Option<String>,
    minted_at: SimTime,
    used: bool,
}

/// The number a redeemed code stands for.
#[derive(Debug, PartialEq, Eq)]
struct PhoneNumber {
    pure_phone_number: String,
    country_code: String,
}

impl PhoneNumber {
    /// `phoneNumber`: the pure number for China, else `+`, the country code and the number
    /// (WeChat says foreign numbers carry their country code; the exact form is unconfirmed).
    fn phone_number(&self) -> String {
        if self.country_code == DEFAULT_COUNTRY_CODE {
            self.pure_phone_number.clone()
        } else {
            format!("+{}{}", self.country_code, self.pure_phone_number)
        }
    }
}

/// Every phone code minted, and how `countryCode` is answered.
#[derive(Debug, Default)]
pub(crate) struct PhoneCodes {
    codes: HashMap<String, PhoneCode>,
    /// Answer `countryCode` as a JSON number instead of a string.
    country_code_as_number: bool,
}

impl PhoneCodes {
    fn mint(
        &mut self,
        number: PhoneNumber,
        openid: Option<String>,
        now: SimTime,
    ) -> Result<String, RandomError> {
        let code = loop {
            let code = ids::phone_code()?;
            if !self.codes.contains_key(&code) {
                break code;
            }
        };
        self.codes.insert(
            code.clone(),
            PhoneCode {
                pure_phone_number: number.pure_phone_number,
                country_code: number.country_code,
                openid,
                minted_at: now,
                used: false,
            },
        );
        Ok(code)
    }

    /// Checks `code` (and `openid`, when given) at `now` and consumes it. Unknown, expired,
    /// already used or not `openid`'s: 40029, as WeChat documents; a refused code is not
    /// consumed. A code minted without an owner belongs to a user nobody named, so every
    /// `openid` is another user's for it: only a call without `openid` redeems it.
    fn redeem(
        &mut self,
        code: &str,
        openid: Option<&str>,
        now: SimTime,
    ) -> Result<PhoneNumber, WechatError> {
        let invalid = || WechatError::new(WechatError::INVALID_CODE);
        let phone = self
            .codes
            .get_mut(code)
            .filter(|phone| now.saturating_sub(phone.minted_at) <= CODE_LIFETIME)
            .ok_or_else(invalid)?;
        if phone.used {
            return Err(invalid());
        }
        if let Some(asked) = openid
            && phone.openid.as_deref() != Some(asked)
        {
            return Err(invalid());
        }
        phone.used = true;
        Ok(PhoneNumber {
            pure_phone_number: phone.pure_phone_number.clone(),
            country_code: phone.country_code.clone(),
        })
    }
}

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route("/wxa/business/getuserphonenumber", post(getuserphonenumber))
        .route("/sim/phone-codes", post(mint_phone_code))
        .route("/sim/phone-number-format", post(set_format))
}

async fn getuserphonenumber(
    State(state): State<SimState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = Params::from_query(query);
    let body = wechat::json_object(body);
    let code = body
        .as_ref()
        .and_then(|body| body.get("code"))
        .and_then(serde_json::Value::as_str)
        .filter(|code| !code.is_empty());
    if let Some(answer) = wechat::begin_call(&state, ENDPOINT, code).await {
        return answer;
    }
    let appid = state.settings().appid.as_str();
    let answer =
        state.with_world(|world| redeem(world, params.get("access_token"), body.as_ref(), appid));
    wechat::respond(ENDPOINT, answer)
}

/// The checks, in order: the access_token, the body (47001 unless a JSON object whose `code`
/// and `openid` are strings), the code (41008 missing), then the code itself.
fn redeem(
    world: &mut World,
    access_token: Option<&str>,
    body: Option<&serde_json::Map<String, serde_json::Value>>,
    appid: &str,
) -> Result<serde_json::Value, WechatError> {
    access_token::check(world, access_token)?;
    let body = body.ok_or_else(|| WechatError::new(WechatError::DATA_FORMAT))?;
    let code = wechat::string_field(body, "code")?.filter(|code| !code.is_empty());
    let openid = wechat::string_field(body, "openid")?.filter(|openid| !openid.is_empty());
    let code = code.ok_or_else(|| WechatError::new(WechatError::MISSING_CODE))?;
    let now = world.clock.now();
    let number = world.phone_codes.redeem(code, openid, now)?;
    let country_code = if world.phone_codes.country_code_as_number {
        number
            .country_code
            .parse::<u64>()
            .map_or_else(|_| number.country_code.clone().into(), Into::into)
    } else {
        serde_json::Value::from(number.country_code.clone())
    };
    Ok(wechat::ok_body(serde_json::json!({
        "phone_info": {
            "phoneNumber": number.phone_number(),
            "purePhoneNumber": number.pure_phone_number,
            "countryCode": country_code,
            "watermark": {
                "timestamp": world.clock.unix_seconds(now),
                "appid": appid,
            },
        },
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    phone_number: String,
    country_code: Option<String>,
    openid: Option<String>,
}

#[derive(Debug, Serialize)]
struct MintAnswer {
    code: String,
}

fn all_digits(text: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&text.len()) && text.chars().all(|c| c.is_ascii_digit())
}

async fn mint_phone_code(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<MintBody>,
) -> Result<Json<MintAnswer>, ControlError> {
    if !all_digits(&body.phone_number, 4, 20) {
        return Err(ControlError::bad_request(
            "phone_number must be 4 to 20 ASCII digits, without country code",
        ));
    }
    let country_code = body
        .country_code
        .unwrap_or_else(|| DEFAULT_COUNTRY_CODE.to_owned());
    if !all_digits(&country_code, 1, 4) {
        return Err(ControlError::bad_request(
            "country_code must be 1 to 4 ASCII digits, without +",
        ));
    }
    let openid = body.openid.map(|id| check_id("openid", id)).transpose()?;
    let number = PhoneNumber {
        pure_phone_number: body.phone_number,
        country_code,
    };
    let code = state.with_world(|world| {
        let now = world.clock.now();
        world.phone_codes.mint(number, openid, now)
    })?;
    tracing::info!("phone code minted");
    Ok(Json(MintAnswer { code }))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FormatBody {
    country_code_as_number: bool,
}

async fn set_format(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<FormatBody>,
) -> Json<FormatBody> {
    state.with_world(|world| {
        world.phone_codes.country_code_as_number = body.country_code_as_number;
    });
    tracing::info!(
        country_code_as_number = body.country_code_as_number,
        "phone number format set"
    );
    Json(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(pure: &str, country_code: &str) -> PhoneNumber {
        PhoneNumber {
            pure_phone_number: pure.to_owned(),
            country_code: country_code.to_owned(),
        }
    }

    fn minted(codes: &mut PhoneCodes, openid: Option<&str>) -> String {
        codes
            .mint(
                number("13800138000", "86"),
                openid.map(str::to_owned),
                SimTime::ZERO,
            )
            .expect("random")
    }

    fn errcode(result: Result<PhoneNumber, WechatError>) -> i64 {
        result.expect_err("an error").errcode()
    }

    #[test]
    fn a_code_is_redeemed_once() {
        let mut codes = PhoneCodes::default();
        let code = minted(&mut codes, Some("oOwner"));
        assert_eq!(
            codes.redeem(&code, Some("oOwner"), SimTime::ZERO),
            Ok(number("13800138000", "86"))
        );
        assert_eq!(errcode(codes.redeem(&code, None, SimTime::ZERO)), 40029);
    }

    #[test]
    fn a_code_of_a_named_user_redeems_without_openid() {
        let mut codes = PhoneCodes::default();
        let code = minted(&mut codes, Some("oOwner"));
        assert!(codes.redeem(&code, None, SimTime::ZERO).is_ok());
    }

    #[test]
    fn a_code_minted_without_owner_refuses_every_openid_without_being_used() {
        let mut codes = PhoneCodes::default();
        let code = minted(&mut codes, None);
        assert_eq!(
            errcode(codes.redeem(&code, Some("oAnyone"), SimTime::ZERO)),
            40029,
            "the code is some user's, not whoever asks"
        );
        assert_eq!(
            codes.redeem(&code, None, SimTime::ZERO),
            Ok(number("13800138000", "86"))
        );
    }

    #[test]
    fn a_code_lives_five_minutes() {
        let mut codes = PhoneCodes::default();
        let code = minted(&mut codes, None);
        let late = CODE_LIFETIME + Duration::from_secs(1);
        assert_eq!(errcode(codes.redeem(&code, None, late)), 40029);
        assert!(codes.redeem(&code, None, CODE_LIFETIME).is_ok());
        assert_eq!(errcode(codes.redeem("nope", None, SimTime::ZERO)), 40029);
    }

    #[test]
    fn another_users_openid_is_refused_without_using_the_code() {
        let mut codes = PhoneCodes::default();
        let code = minted(&mut codes, Some("oOwner"));
        assert_eq!(
            errcode(codes.redeem(&code, Some("oOther"), SimTime::ZERO)),
            40029
        );
        assert!(codes.redeem(&code, Some("oOwner"), SimTime::ZERO).is_ok());
    }

    #[test]
    fn a_foreign_number_carries_its_country_code() {
        assert_eq!(number("13800138000", "86").phone_number(), "13800138000");
        assert_eq!(number("61234567", "852").phone_number(), "+85261234567");
    }
}
