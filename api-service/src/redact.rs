//! Debug output for the types that hold what must stay out of logs (tokens, login and phone
//! codes, phone numbers, encryptedData and what it decrypts to): the type and every field's
//! name, with the secret fields' values left out. Nothing formats these types today; this
//! keeps a future `?value`, `{:?}` or `#[instrument]` from printing one.

/// `impl Debug for Type`, showing the fields before `;` and hiding those after it.
macro_rules! redacted_debug {
    ($ty:ident { $($shown:ident),* ; $($hidden:ident),+ }) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($shown), &self.$shown))*
                    $(.field(stringify!($hidden), &format_args!("<redacted>")))+
                    .finish()
            }
        }
    };
}

pub(crate) use redacted_debug;

#[cfg(test)]
mod tests {
    use crate::auth::{Authenticated, BearerToken, Identity, PhoneNumber, TokenPair};
    use crate::routes::auth::{LoginBody, RefreshBody};
    use crate::routes::me::{Me, PhoneBody};
    use crate::routes::wechat::{DecryptBody, Decrypted};
    use crate::time::Rfc3339;

    const SECRET: &str = "s3cret-value-13800138000";

    fn phone() -> PhoneNumber {
        PhoneNumber {
            phone_number: SECRET.to_owned(),
            pure_phone_number: SECRET.to_owned(),
            country_code: SECRET.to_owned(),
        }
    }

    fn body<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).expect("a valid body")
    }

    #[test]
    fn debug_output_names_the_fields_and_hides_the_secrets() {
        let identity = Identity {
            openid: "o-openid".to_owned(),
            unionid: None,
            session_id: "s-1".to_owned(),
            phone: Some(phone()),
        };
        let shown = [
            format!("{:?}", BearerToken(SECRET.to_owned())),
            format!(
                "{:?}",
                Authenticated {
                    identity: identity.clone(),
                    token: SECRET.to_owned(),
                }
            ),
            format!("{identity:?}"),
            format!(
                "{:?}",
                TokenPair {
                    access_token: SECRET.to_owned(),
                    token_type: "Bearer".to_owned(),
                    expires_in: 7200,
                    refresh_token: SECRET.to_owned(),
                    refresh_expires_in: 1,
                    openid: "o-openid".to_owned(),
                    is_new_user: false,
                }
            ),
            format!(
                "{:?}",
                body::<LoginBody>(serde_json::json!({"code": SECRET}))
            ),
            format!(
                "{:?}",
                body::<RefreshBody>(serde_json::json!({"refresh_token": SECRET}))
            ),
            format!(
                "{:?}",
                body::<PhoneBody>(serde_json::json!({"code": SECRET}))
            ),
            format!(
                "{:?}",
                body::<DecryptBody>(serde_json::json!({"encrypted_data": SECRET, "iv": SECRET}))
            ),
            format!(
                "{:?}",
                Decrypted {
                    data: serde_json::json!({"phoneNumber": SECRET}),
                }
            ),
            format!(
                "{:?}",
                Me {
                    openid: "o-openid".to_owned(),
                    unionid: None,
                    nickname: None,
                    avatar_url: None,
                    phone_number: Some(SECRET.to_owned()),
                    created_at: Rfc3339(0),
                    updated_at: Rfc3339(0),
                }
            ),
        ];
        for text in &shown {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
        // What is not secret is still there to debug with.
        assert!(shown[1].contains("o-openid"), "{}", shown[1]);
        assert!(shown[3].contains("is_new_user"), "{}", shown[3]);
    }
}
