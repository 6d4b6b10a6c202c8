//! Random identifiers shaped like WeChat's: openids, unionids, login codes, session keys,
//! access tokens, phone codes, and the `rid` that ends every error message.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub(crate) struct RandomError(getrandom::Error);

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).map_err(RandomError)?;
    Ok(bytes)
}

/// A session key: the standard base64 (24 characters) of 16 random bytes.
pub(crate) fn session_key() -> Result<String, RandomError> {
    Ok(STANDARD.encode(random_bytes::<16>()?))
}

/// An openid or a unionid: `o` and 27 URL-safe base64 characters (20 random bytes).
pub(crate) fn user_id() -> Result<String, RandomError> {
    Ok(format!(
        "o{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<20>()?)
    ))
}

/// A login code: 32 characters of `[A-Za-z0-9]`, the first one `0` as in real codes.
pub(crate) fn login_code() -> Result<String, RandomError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut code = String::with_capacity(32);
    code.push('0');
    while code.len() < 32 {
        // 248 = 4 × 62: bytes at or above it are skipped, so every character is equally likely.
        for byte in random_bytes::<32>()? {
            if byte < 248 && code.len() < 32 {
                code.push(char::from(ALPHABET[usize::from(byte % 62)]));
            }
        }
    }
    Ok(code)
}

/// An access token: `98_` and 152 URL-safe base64 characters (114 random bytes), 155 characters
/// in all, the length and alphabet of WeChat's (which keeps room for 512).
pub(crate) fn access_token() -> Result<String, RandomError> {
    Ok(format!(
        "98_{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<114>()?)
    ))
}

/// A phone code, as `<button open-type="getPhoneNumber">` gives: 64 lowercase hex digits.
pub(crate) fn phone_code() -> Result<String, RandomError> {
    Ok(random_bytes::<32>()?
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// A request id like WeChat's (`64a3c6f4-1d2b5b7e-0c1f5a3e`): the time and a counter, so it
/// is unique within a run and needs no random numbers.
pub(crate) fn rid() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The low 32 bits of the seconds, as in WeChat's.
    let secs = now.as_secs() & 0xffff_ffff;
    format!("{secs:08x}-{:08x}-{seq:08x}", now.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_key_is_24_base64_characters_of_16_bytes() {
        let key = session_key().expect("random");
        assert_eq!(key.len(), 24);
        assert_eq!(STANDARD.decode(&key).expect("base64").len(), 16);
    }

    #[test]
    fn a_user_id_is_o_and_27_url_safe_characters() {
        let id = user_id().expect("random");
        assert_eq!(id.len(), 28);
        assert!(id.starts_with('o'));
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn a_login_code_is_32_alphanumerics_starting_with_0() {
        let code = login_code().expect("random");
        assert_eq!(code.len(), 32);
        assert!(code.starts_with('0'));
        assert!(code.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(code, login_code().expect("random"));
    }

    #[test]
    fn an_access_token_is_155_url_safe_characters() {
        let token = access_token().expect("random");
        assert_eq!(token.len(), 155);
        assert!(token.starts_with("98_"));
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(token, access_token().expect("random"));
    }

    #[test]
    fn a_phone_code_is_64_lowercase_hex_digits() {
        let code = phone_code().expect("random");
        assert_eq!(code.len(), 64);
        assert!(
            code.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, 'a'..='f'))
        );
    }

    #[test]
    fn rids_differ() {
        assert_ne!(rid(), rid());
    }
}
