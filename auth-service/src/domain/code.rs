//! The code `wx.login()` gives the mini-program, checked before WeChat is ever called.

use super::Invalid;

/// A syntactically valid `wx.login` code: 1 to 128 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, PartialEq, Eq)]
pub struct WechatCode(String);

impl WechatCode {
    /// Checks a code as the contract requires; WeChat is not called for one that fails.
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        if let Some(problem) = shared::code_problem(raw) {
            return Err(Invalid::new("code", problem));
        }
        Ok(Self(raw.to_owned()))
    }
}

impl AsRef<str> for WechatCode {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// A code is a one-time credential: keep it out of Debug output.
impl std::fmt::Debug for WechatCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WechatCode(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_typical_code() {
        assert!(WechatCode::parse("0a3Xyz_b-9").is_ok());
        assert!(WechatCode::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        for bad in ["", " ", "abc def", "abc/def", "代码", "a+b", "a=b"] {
            let err = WechatCode::parse(bad).expect_err(bad);
            assert_eq!(err.field, "code");
        }
        assert!(WechatCode::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn debug_does_not_show_the_code() {
        let code = WechatCode::parse("secretcode").expect("valid");
        assert!(!format!("{code:?}").contains("secretcode"));
    }
}
