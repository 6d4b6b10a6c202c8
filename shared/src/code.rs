//! The rule for the codes the mini-program gets from WeChat (`wx.login`'s, and the
//! getPhoneNumber button's), checked by auth-service before WeChat is ever called and by
//! api-service before auth-service is: one rule in one place.

/// Longest code accepted (CONTRACT.md, Login errors).
pub const MAX_CODE_LEN: usize = 128;

/// What is wrong with `raw` as a WeChat code, or `None`: a code is 1 to [`MAX_CODE_LEN`]
/// characters of `[A-Za-z0-9_-]`. The answer never quotes the code (a one-time credential).
pub fn code_problem(raw: &str) -> Option<&'static str> {
    if raw.is_empty() {
        return Some("is missing");
    }
    if raw.len() > MAX_CODE_LEN {
        return Some("is longer than 128 characters");
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Some("has a character outside [A-Za-z0-9_-]");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_1_to_128_characters_of_letters_digits_underscore_and_dash() {
        assert_eq!(code_problem("0a3Xyz_b-9"), None);
        assert_eq!(code_problem(&"a".repeat(MAX_CODE_LEN)), None);
        assert_eq!(code_problem(""), Some("is missing"));
        assert_eq!(
            code_problem(&"a".repeat(MAX_CODE_LEN + 1)),
            Some("is longer than 128 characters")
        );
        for bad in ["a b", "a$", "ａ", "a\0", "a.b"] {
            assert_eq!(
                code_problem(bad),
                Some("has a character outside [A-Za-z0-9_-]"),
                "{bad:?}"
            );
        }
    }
}
