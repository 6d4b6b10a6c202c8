//! Keys derived from `AUTH_TOKEN_KEY`, and the two things done with them: keyed hashes of
//! tokens and codes (HMAC-SHA256), and encryption at rest (AES-256-GCM).
//!
//! Each use gets its own key through HKDF-SHA256 with a distinct `info`, so no key serves
//! two purposes. Changing `AUTH_TOKEN_KEY` therefore invalidates every token and makes the
//! stored session_keys unreadable (users simply log in again).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::domain::Token;

type HmacSha256 = Hmac<Sha256>;

const NONCE_LEN: usize = 12;

/// A keyed hash of a token: what the database stores instead of the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// Encryption or decryption failed (wrong key, tampered data, or no randomness).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CryptoError(&'static str);

/// Every key the service uses, derived once at start-up.
pub struct Keys {
    token_hash: HmacSha256,
    code_hash: HmacSha256,
    fingerprint: HmacSha256,
    successor: HmacSha256,
    at_rest: Aes256Gcm,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derives the keys from the master secret (already checked to be at least 32 bytes).
    pub fn derive(master: &SecretString) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"wxauth/v1"), master.expose_secret().as_bytes());
        let key = |info: &[u8]| {
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: this cannot fail.
            if hk.expand(info, &mut out).is_err() {
                unreachable!("HKDF output of 32 bytes is always valid");
            }
            out
        };
        let hmac = |info: &[u8]| {
            // HMAC accepts keys of any length: this cannot fail.
            match <HmacSha256 as Mac>::new_from_slice(&key(info)) {
                Ok(m) => m,
                Err(_) => unreachable!("HMAC takes a key of any length"),
            }
        };
        Self {
            token_hash: hmac(b"token-hash"),
            code_hash: hmac(b"code-hash"),
            fingerprint: hmac(b"fingerprint"),
            successor: hmac(b"refresh-successor"),
            at_rest: Aes256Gcm::new(&key(b"at-rest").into()),
        }
    }

    /// The keyed hash under which a token is stored.
    pub fn token_hash(&self, token: &Token) -> TokenHash {
        TokenHash(mac(&self.token_hash, token.expose().as_bytes()))
    }

    /// The keyed hash under which a used or in-flight login code is remembered.
    pub fn code_hash(&self, code: &str) -> String {
        hex::encode(mac(&self.code_hash, code.as_bytes()))
    }

    /// A keyed fingerprint of a secret: equal secrets give equal fingerprints, and the
    /// fingerprint tells nothing of the secret without the key.
    pub fn fingerprint(&self, secret: &[u8]) -> [u8; 32] {
        mac(&self.fingerprint, secret)
    }

    /// Encrypts `plaintext` at rest, bound to `context` (for example the openid it belongs
    /// to, so a ciphertext copied to another row does not decrypt). Output: nonce || sealed.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.at_rest, plaintext, context)
    }

    /// Decrypts what [`Keys::seal`] produced with the same context.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.at_rest, sealed, context)
    }

    /// Encrypts the successor pair of a rotated refresh token under a key that only the
    /// holder of that refresh token can reproduce: the server alone cannot read it back
    /// from the database without the token the client presents.
    pub fn seal_for_token(&self, token: &Token, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        seal_with(&self.successor_cipher(token), plaintext, b"successor")
    }

    /// Decrypts what [`Keys::seal_for_token`] produced for the same token.
    pub fn open_for_token(&self, token: &Token, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.successor_cipher(token), sealed, b"successor")
    }

    fn successor_cipher(&self, token: &Token) -> Aes256Gcm {
        let key = mac(&self.successor, token.expose().as_bytes());
        Aes256Gcm::new(&key.into())
    }
}

fn mac(base: &HmacSha256, data: &[u8]) -> [u8; 32] {
    let mut m = base.clone();
    m.update(data);
    m.finalize().into_bytes().into()
}

fn seal_with(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| CryptoError("no randomness for a nonce"))?;
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError("encryption failed"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open_with(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN {
        return Err(CryptoError("sealed data too short"));
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
        .map_err(|_| CryptoError("decryption failed: wrong key or tampered data"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TokenKind;

    fn keys(secret: &str) -> Keys {
        Keys::derive(&SecretString::from(secret.to_owned()))
    }

    #[test]
    fn token_hashes_are_keyed_and_stable() {
        let t = Token::generate(TokenKind::Access).expect("rng");
        let a = keys("a".repeat(32).as_str());
        let b = keys("b".repeat(32).as_str());
        assert_eq!(a.token_hash(&t), a.token_hash(&t));
        assert_ne!(a.token_hash(&t), b.token_hash(&t));
    }

    #[test]
    fn sealed_data_opens_only_with_the_same_key_and_context() {
        let k = keys(&"k".repeat(40));
        let sealed = k.seal(b"session-key", b"openid-1").expect("seal");
        assert!(!sealed.windows(11).any(|w| w == b"session-key"));
        assert_eq!(k.open(&sealed, b"openid-1").expect("open"), b"session-key");
        assert!(k.open(&sealed, b"openid-2").is_err());
        assert!(keys(&"x".repeat(40)).open(&sealed, b"openid-1").is_err());
        let mut tampered = sealed.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert!(k.open(&tampered, b"openid-1").is_err());
        assert!(k.open(&sealed[..5], b"openid-1").is_err());
    }

    #[test]
    fn successor_needs_the_refresh_token() {
        let k = keys(&"k".repeat(40));
        let t1 = Token::generate(TokenKind::Refresh).expect("rng");
        let t2 = Token::generate(TokenKind::Refresh).expect("rng");
        let sealed = k.seal_for_token(&t1, b"pair").expect("seal");
        assert_eq!(k.open_for_token(&t1, &sealed).expect("open"), b"pair");
        assert!(k.open_for_token(&t2, &sealed).is_err());
    }
}
