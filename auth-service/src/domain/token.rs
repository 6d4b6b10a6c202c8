//! wxauth's own opaque tokens: 256 random bits, URL-safe, with a prefix that tells the kind.
//!
//! A token is only ever stored as a keyed hash (see `crypto::Keys::token_hash`); the plain
//! value exists in memory between its birth and the answer that carries it to the client.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Random bytes in a token: 256 bits.
const RANDOM_BYTES: usize = 32;
/// Length of those bytes in unpadded base64url.
const ENCODED_LEN: usize = 43;

/// Which of the pair a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Short-lived, sent on every business request.
    Access,
    /// Long-lived, exchanged once for the next pair.
    Refresh,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Access => "wxa_",
            Self::Refresh => "wxr_",
        }
    }
}

/// A well-formed token of a known kind. Its Debug output never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    kind: TokenKind,
    value: String,
}

impl Token {
    /// A new token from the operating system's CSPRNG.
    pub fn generate(kind: TokenKind) -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; RANDOM_BYTES];
        getrandom::fill(&mut bytes)?;
        let mut value = String::with_capacity(kind.prefix().len() + ENCODED_LEN);
        value.push_str(kind.prefix());
        URL_SAFE_NO_PAD.encode_string(bytes, &mut value);
        Ok(Self { kind, value })
    }

    /// Accepts only a token of `kind` in the exact form `generate` makes; anything else is
    /// garbled and can be refused without a database read.
    pub fn parse(kind: TokenKind, raw: &str) -> Option<Self> {
        let body = raw.strip_prefix(kind.prefix())?;
        // The decoder refuses any byte outside base64url, padding, and set trailing bits, so
        // a body that decodes to 32 bytes is exactly what `generate` writes. Decoded onto the
        // stack: this runs on every `Verify`.
        let mut bytes = [0u8; RANDOM_BYTES + 4];
        let well_formed = body.len() == ENCODED_LEN
            && URL_SAFE_NO_PAD
                .decode_slice(body, &mut bytes)
                .is_ok_and(|n| n == RANDOM_BYTES);
        well_formed.then(|| Self {
            kind,
            value: raw.to_owned(),
        })
    }

    /// The token's kind.
    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// The value to hand to the client (and to hash). Never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({:?}, ..)", self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back_and_differ() {
        let a = Token::generate(TokenKind::Access).expect("rng");
        let b = Token::generate(TokenKind::Access).expect("rng");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 4 + ENCODED_LEN);
        assert_eq!(Token::parse(TokenKind::Access, a.expose()), Some(a.clone()));
        // The kinds do not mix.
        assert_eq!(Token::parse(TokenKind::Refresh, a.expose()), None);
    }

    #[test]
    fn garbled_tokens_are_refused() {
        let good = Token::generate(TokenKind::Refresh).expect("rng");
        let raw = good.expose();
        for bad in [
            "",
            "wxr_",
            &raw[..raw.len() - 1],
            &format!("{raw}A"),
            &raw.replace("wxr_", "WXR_"),
            &format!("wxr_{}", "!".repeat(ENCODED_LEN)),
            // base64 but not base64url, padded, or with its unused last bits set.
            &format!("wxr_{}+", "A".repeat(ENCODED_LEN - 1)),
            &format!("wxr_{}/", "A".repeat(ENCODED_LEN - 1)),
            &format!("wxr_{}=", "A".repeat(ENCODED_LEN - 1)),
            &format!("wxr_{}B", "A".repeat(ENCODED_LEN - 1)),
            &format!("wxr_{} ", "A".repeat(ENCODED_LEN - 1)),
        ] {
            assert!(Token::parse(TokenKind::Refresh, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn any_canonical_base64url_body_of_32_bytes_parses() {
        let body = format!("{}-_E", "A".repeat(ENCODED_LEN - 3));
        let t = Token::parse(TokenKind::Access, &format!("wxa_{body}")).expect("well formed");
        assert_eq!(&t.expose()[4..], body);
    }

    #[test]
    fn debug_hides_the_value() {
        let t = Token::generate(TokenKind::Access).expect("rng");
        assert!(!format!("{t:?}").contains(&t.expose()[4..]));
    }
}
