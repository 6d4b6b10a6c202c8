//! Users' profiles: nickname and avatar, as the mini-program collects them (`chooseAvatar`
//! and `<input type="nickname">`, WECHAT.md §6), scoped to the openid `Verify` returned.

mod kept;
mod postgres;
mod stamps;
mod store;

use async_trait::async_trait;

pub use kept::{KEPT_PROFILES, KeptProfiles};
pub use postgres::PgProfiles;
pub use stamps::Stamps;
pub use store::SqliteProfiles;

use crate::error::ApiError;
use crate::time::Millis;

/// A checked nickname: 1 to 64 characters of any script, no control characters, not blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nickname(String);

impl Nickname {
    /// Checks a nickname as sent.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let n = raw.chars().count();
        if n == 0 || raw.trim().is_empty() {
            return Err(ApiError::invalid(
                "nickname",
                "invalid_argument",
                "nickname must not be empty",
            ));
        }
        if n > 64 {
            return Err(ApiError::invalid(
                "nickname",
                "invalid_argument",
                "nickname must be at most 64 characters",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "nickname",
                "invalid_argument",
                "nickname must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The nickname.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A checked avatar URL: `https://` with a host, at most 1,024 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvatarUrl(String);

impl AvatarUrl {
    /// Checks an avatar URL as sent.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let invalid = |m: &str| ApiError::invalid("avatar_url", "invalid_argument", m);
        if raw.chars().count() > 1024 {
            return Err(invalid("avatar_url must be at most 1024 characters"));
        }
        // The URL is kept as sent; the parser below would quietly accept some control
        // characters (and PostgreSQL cannot store NUL in text at all).
        if raw.chars().any(char::is_control) {
            return Err(invalid("avatar_url must not contain control characters"));
        }
        // Nor spaces, which the parser would percent-encode: the URL kept would not be one
        // (an <image> given it may not load), and it is kept as sent.
        if raw.chars().any(char::is_whitespace) {
            return Err(invalid("avatar_url must not contain spaces"));
        }
        let url = url::Url::parse(raw).map_err(|_| invalid("avatar_url must be a URL"))?;
        if url.scheme() != "https" || url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("avatar_url must be an https:// URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("avatar_url must not carry credentials"));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The URL as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Whose.
    pub openid: String,
    /// The nickname, if set.
    pub nickname: Option<String>,
    /// The avatar URL, if set.
    pub avatar_url: Option<String>,
    /// When the profile was first seen.
    pub created_at: Millis,
    /// When it last changed.
    pub updated_at: Millis,
}

/// A change: `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfilePatch {
    /// New nickname.
    pub nickname: Option<Option<Nickname>>,
    /// New avatar URL.
    pub avatar_url: Option<Option<AvatarUrl>>,
}

/// Where profiles live.
#[async_trait]
pub trait ProfileStore: Send + Sync + std::fmt::Debug + 'static {
    /// The user's profile, created empty on first sight.
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError>;
    /// Applies a change and returns the profile after it.
    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicknames_of_any_script_up_to_64_characters() {
        assert!(Nickname::parse("微信用户").is_ok());
        assert!(Nickname::parse("Zoë 🌸").is_ok());
        assert!(Nickname::parse(&"名".repeat(64)).is_ok());
        for bad in ["", "   ", "a\nb"] {
            assert_eq!(
                Nickname::parse(bad).expect_err(bad).code(),
                "invalid_argument"
            );
        }
        assert!(Nickname::parse(&"名".repeat(65)).is_err());
    }

    #[test]
    fn avatars_are_https_only() {
        assert!(AvatarUrl::parse("https://thirdwx.qlogo.cn/mmopen/abc/132").is_ok());
        for bad in [
            "http://example.com/a.png",
            "ftp://example.com/a.png",
            "javascript:alert(1)",
            "https://",
            "not a url",
            "https://user:pw@example.com/a.png",
            "https://example.com/a\0.png",
            "https://example.com/a\t.png",
            "https://example.com/a b.png",
            "https://example.com/a\u{3000}b.png",
        ] {
            assert!(AvatarUrl::parse(bad).is_err(), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(1010));
        assert!(AvatarUrl::parse(&long).is_err());
    }
}
