//! Request bodies: JSON only, with errors in the contract's shape that name the field at
//! fault. `Json<T>` needs a body; `JsonOrEmpty<T>` takes an empty one as `T::default()`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

/// A JSON request body that may be absent.
#[derive(Debug, Clone)]
pub struct JsonOrEmpty<T>(pub T);

/// Whether the body is declared JSON: one `Content-Type`, `application/json` (or
/// `application/…+json`), and no charset but UTF-8, the only one this API decodes (a second
/// header or another charset would be read as UTF-8 all the same, whatever was meant).
fn is_json(headers: &HeaderMap) -> bool {
    let mut declared = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (declared.next(), declared.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let mut parts = value.split(';');
    let media = parts
        .next()
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let json = media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"));
    json && parts.all(|param| match param.split_once('=') {
        Some((name, charset)) if name.trim().eq_ignore_ascii_case("charset") => {
            let charset = charset.trim().trim_matches('"');
            charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    })
}

async fn body(req: Request) -> Result<(HeaderMap, Bytes), ApiError> {
    let headers = req.headers().clone();
    let bytes = Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE)
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read",
            )
        }
    })?;
    Ok((headers, bytes))
}

fn parse<T: DeserializeOwned>(headers: &HeaderMap, bytes: &[u8]) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::from_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
    }
    let not_json = |e: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!(
                "the body is not valid JSON for this request: {}",
                without_value(&e)
            ),
        )
    };
    // Every body this API takes is an object. serde would also fill a struct from an array,
    // field by field in order (`["a title","a body"]` made a note): refused here. A nested
    // object's field refuses an array with `optional_object`.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A key given twice (`{"title":"a","title":"b"}`) is refused by serde at the object
        // that holds it, whose path does not name the key: named here from serde's message.
        if let Some(key) = duplicate_key(&inner) {
            let field = if path == "." {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
            let message = format!("{field}: given more than once");
            return ApiError::invalid(&field, "invalid_request", message);
        }
        if inner.is_data() && path != "." {
            let message = format!("{path}: {}", without_value(&inner));
            ApiError::invalid(&path, "invalid_request", message)
        } else {
            not_json(inner)
        }
    })?;
    // One JSON value and nothing after it but whitespace: `{"title":"a"}xyz` is not JSON.
    de.end().map_err(not_json)?;
    Ok(value)
}

/// The key serde found twice in one object (its message: ``duplicate field `title` at line
/// 1 column 24``), if that is the error.
fn duplicate_key(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    let rest = text.strip_prefix("duplicate field `")?;
    rest.split_once('`').map(|(key, _)| key.to_owned())
}

/// serde_json's message, less the value it found when that was of the wrong type, out of
/// range or not one of an enum's: `invalid type: string "wxr_…", expected u32` quotes what
/// the client sent, which may be a token or a code sent in the wrong field, and an error body
/// ends up in client and proxy logs. Syntax errors and missing fields name no value; an
/// unknown field is named (the key, not its value), so that a typo can be found.
fn without_value(e: &serde_json::Error) -> String {
    let text = e.to_string();
    for (prefix, what) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "invalid value"),
        ("unknown variant ", "unknown value"),
    ] {
        if text.starts_with(prefix) {
            // serde writes `{found}, expected {what the type takes}` and serde_json adds the
            // position: the found value is before the last `, expected `.
            return match text.rfind(", expected ") {
                Some(at) => format!("{what}{}", &text[at..]),
                None => what.to_owned(),
            };
        }
    }
    text
}

/// For a `code` field (`#[serde(default, deserialize_with = "crate::json::code")]`): a
/// string is the code; anything else (`null`, a number, an object) is no code, which the
/// route answers as it answers a missing one: 400 `invalid_code`, field `code` (the contract
/// calls every malformed code that), instead of a type error.
pub(crate) fn code<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize as _;
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(code) => Some(code),
        _ => None,
    })
}

/// For a field that holds an optional object (`#[serde(default, deserialize_with =
/// "crate::json::optional_object")]`): a JSON object or `null`, nothing else. serde would
/// also fill the struct from an array, field by field in order (`"device": ["my-phone",
/// "ios"]`), as it would a whole body ([`parse`] refuses that at the top): here such a
/// value is the wrong type, a 400 that names the field. Inside the object, fields are
/// checked, and named in errors, as before.
pub(crate) fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct ObjectOrNull<T>(std::marker::PhantomData<T>);

    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for ObjectOrNull<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object or null")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: serde::Deserializer<'de>>(
            self,
            deserializer: D2,
        ) -> Result<Self::Value, D2::Error> {
            // Any other kind of value falls to the visitor's default: the wrong type.
            deserializer.deserialize_any(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_option(ObjectOrNull(std::marker::PhantomData))
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (headers, bytes) = body(req).await?;
        parse(&headers, &bytes).map(Self)
    }
}

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for JsonOrEmpty<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (headers, bytes) = body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse(&headers, &bytes).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Note {
        #[allow(dead_code)]
        title: String,
    }

    fn json_headers(ct: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        h
    }

    #[test]
    fn media_types() {
        assert!(is_json(&json_headers("application/json")));
        assert!(is_json(&json_headers("application/json; charset=utf-8")));
        assert!(is_json(&json_headers("Application/JSON")));
        assert!(is_json(&json_headers("application/json;charset=UTF-8")));
        assert!(is_json(&json_headers(
            "application/json; charset=\"utf-8\""
        )));
        assert!(!is_json(&json_headers("text/plain")));
        assert!(!is_json(&json_headers("application/json; charset=utf-16")));
        assert!(!is_json(&json_headers("application/json; charset=gbk")));
        assert!(!is_json(&HeaderMap::new()));
        let mut two = json_headers("application/json");
        two.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&two), "two Content-Type headers");
    }

    #[test]
    fn errors_name_the_field_or_the_syntax() {
        let h = json_headers("application/json");
        let e = parse::<Note>(&h, br#"{"title": 5}"#).expect_err("wrong type");
        assert_eq!(e.code(), "invalid_request");
        let e = parse::<Note>(&h, b"{not json").expect_err("syntax");
        assert_eq!(e.code(), "invalid_json");
        let e = parse::<Note>(&json_headers("text/plain"), b"{}").expect_err("media type");
        assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn errors_never_quote_the_value_sent() {
        #[derive(Debug, serde::Deserialize)]
        struct Login {
            #[allow(dead_code)]
            code: String,
            #[allow(dead_code)]
            limit: Option<u8>,
        }
        let h = json_headers("application/json");
        for (body, field) in [
            (&br#"{"code": 123456789}"#[..], "code"),
            (br#"{"code": ["wxr_secret-token"]}"#, "code"),
            (br#"{"code": "a", "limit": "wxr_secret-token"}"#, "limit"),
            (br#"{"code": "a", "limit": 987654}"#, "limit"),
            (
                br#"{"code": {"x": "wxr_secret-token, expected ok"}}"#,
                "code",
            ),
        ] {
            let e = parse::<Login>(&h, body).expect_err("wrong type");
            let text = String::from_utf8_lossy(body);
            assert_eq!(e.code(), "invalid_request", "{text}");
            let m = e.message();
            assert!(m.starts_with(field), "{text}: {m}");
            assert!(m.contains("expected"), "{text}: {m}");
            for secret in ["123456789", "wxr_secret-token", "987654"] {
                assert!(!m.contains(secret), "{text}: {m}");
            }
        }
        // At the top level too.
        let e = parse::<Login>(&h, br#""wxr_secret-token""#).expect_err("not an object");
        assert_eq!(e.code(), "invalid_json");
        assert!(!e.message().contains("wxr_secret"), "{}", e.message());
    }

    #[test]
    fn an_unknown_enum_value_is_not_quoted_either() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Platform {
            Ios,
        }
        #[derive(Debug, serde::Deserialize)]
        struct Device {
            #[allow(dead_code)]
            platform: Platform,
        }
        let h = json_headers("application/json");
        let e = parse::<Device>(&h, br#"{"platform": "wxr_secret-token"}"#).expect_err("unknown");
        assert_eq!(e.code(), "invalid_request");
        assert!(!e.message().contains("wxr_secret"), "{}", e.message());
        assert!(e.message().contains("ios"), "{}", e.message());
    }

    #[test]
    fn only_an_object_is_a_body() {
        let h = json_headers("application/json");
        for bad in [
            &br#"["a title"]"#[..],
            b" [] ",
            b"null",
            br#""a title""#,
            b"5",
            b"",
        ] {
            let e = parse::<Note>(&h, bad).expect_err("not an object");
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::BAD_REQUEST, "invalid_json"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse::<Note>(&h, b" \n{\"title\":\"a\"}").is_ok());
    }

    #[test]
    fn a_nested_object_given_as_an_array_is_the_wrong_type() {
        use crate::routes::auth::LoginBody;
        let h = json_headers("application/json");
        for bad in [
            &br#"{"code":"c","device":["my-phone","ios"]}"#[..],
            br#"{"code":"c","device":"my-phone"}"#,
            br#"{"code":"c","device":5}"#,
        ] {
            let e = parse::<LoginBody>(&h, bad).expect_err("device is not an object");
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::BAD_REQUEST, "invalid_request"),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(
                e.message().starts_with("device: wrong type"),
                "{}",
                e.message()
            );
            assert!(!e.message().contains("my-phone"), "{}", e.message());
        }
        // An object, null or nothing: as before, with its own fields checked and named.
        let body = parse::<LoginBody>(&h, br#"{"code":"c","device":{"id":"d","platform":"ios"}}"#)
            .expect("an object");
        let device = body.device.expect("a device");
        assert_eq!(
            (device.id.as_deref(), device.platform.as_deref()),
            (Some("d"), Some("ios"))
        );
        for none in [&br#"{"code":"c","device":null}"#[..], br#"{"code":"c"}"#] {
            assert!(
                parse::<LoginBody>(&h, none)
                    .expect("no device")
                    .device
                    .is_none()
            );
        }
        let e = parse::<LoginBody>(&h, br#"{"code":"c","device":{"id":5}}"#).expect_err("id");
        assert!(
            e.message().starts_with("device.id: wrong type"),
            "{}",
            e.message()
        );
        let e = parse::<LoginBody>(&h, br#"{"code":"c","device":{"colour":"red"}}"#)
            .expect_err("unknown field");
        assert!(
            e.message().starts_with("device.colour: unknown field"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn a_key_given_twice_is_named_as_the_field_at_fault() {
        use crate::routes::auth::LoginBody;
        let h = json_headers("application/json");
        for (body, field) in [
            (&br#"{"title":"a","title":"b"}"#[..], "title"),
            (br#"{"code":"c","device":{"id":"d","id":"e"}}"#, "device.id"),
        ] {
            let e = if field == "title" {
                parse::<Note>(&h, body).map(|_| ()).expect_err("twice")
            } else {
                parse::<LoginBody>(&h, body).map(|_| ()).expect_err("twice")
            };
            assert_eq!(
                (e.status(), e.code(), e.field()),
                (StatusCode::BAD_REQUEST, "invalid_request", Some(field)),
                "{}",
                e.message()
            );
            assert!(!e.message().contains('"'), "{}", e.message());
        }
    }

    #[test]
    fn anything_after_the_value_but_whitespace_is_invalid_json() {
        let h = json_headers("application/json");
        for bad in [
            &br#"{"title":"a"}xyz"#[..],
            br#"{"title":"a"}{"title":"b"}"#,
            br#"{"title":"a"} 1"#,
        ] {
            let e = parse::<Note>(&h, bad).expect_err("trailing characters");
            assert_eq!(
                (e.status(), e.code()),
                (StatusCode::BAD_REQUEST, "invalid_json"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse::<Note>(&h, b"{\"title\":\"a\"} \r\n\t").is_ok());
    }
}
