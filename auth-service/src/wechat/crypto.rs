//! WeChat's encryptedData (WECHAT.md §3): AES-128-CBC with PKCS#7 padding, keyed by the
//! user's session_key, with the iv sent beside it; the plaintext is a JSON object whose
//! `watermark.appid` names the app it was made for.
//!
//! Three failures are told apart, where WeChat's own sample lumps the last two together:
//! input that is not base64 or of the wrong length ([`EncryptedData::parse`]), no held key
//! giving valid padding and a JSON object (stale: [`AuthError::SessionKeyStale`]), and a
//! plaintext made for another app ([`AuthError::WatermarkMismatch`]).
//!
//! Nothing here logs: neither the ciphertext, nor the keys, nor the plaintext.

use aes::Aes128;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut as _, KeyIvInit as _};

use super::SessionKey;
use crate::domain::Invalid;
use crate::error::AuthError;

/// AES's block size: the iv's length, and what the ciphertext's length is a multiple of.
const BLOCK: usize = 16;
/// The most encryptedData accepted, in base64 characters (WeChat's payloads are a few KiB).
const MAX_ENCRYPTED_DATA_CHARS: usize = 64 * 1024;

/// An encryptedData/iv pair, decoded and checked for shape (not yet decrypted).
#[derive(Clone)]
pub struct EncryptedData {
    ciphertext: Vec<u8>,
    iv: [u8; BLOCK],
}

// Neither the ciphertext nor the iv belong in logs.
impl std::fmt::Debug for EncryptedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedData")
            .field("len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl EncryptedData {
    /// Decodes both from standard base64 and checks their lengths: the iv 16 bytes, the
    /// ciphertext a non-empty multiple of 16. The error names the field at fault
    /// (`encrypted_data` or `iv`).
    pub fn parse(encrypted_data: &str, iv: &str) -> Result<Self, Invalid> {
        if encrypted_data.is_empty() {
            return Err(Invalid::new("encrypted_data", "is missing"));
        }
        if encrypted_data.len() > MAX_ENCRYPTED_DATA_CHARS {
            return Err(Invalid::new(
                "encrypted_data",
                format!("is longer than {MAX_ENCRYPTED_DATA_CHARS} characters"),
            ));
        }
        let ciphertext = STANDARD
            .decode(encrypted_data)
            .map_err(|_| Invalid::new("encrypted_data", "is not base64"))?;
        if ciphertext.is_empty() || ciphertext.len() % BLOCK != 0 {
            return Err(Invalid::new(
                "encrypted_data",
                "is not a whole number of 16-byte AES blocks",
            ));
        }
        if iv.is_empty() {
            return Err(Invalid::new("iv", "is missing"));
        }
        let iv = STANDARD
            .decode(iv)
            .map_err(|_| Invalid::new("iv", "is not base64"))?
            .try_into()
            .map_err(|_| Invalid::new("iv", "is not 16 bytes"))?;
        Ok(Self { ciphertext, iv })
    }

    /// Decrypts with each key in turn (the newest first) and answers the plaintext of the
    /// first that gives valid padding and a JSON object, once its watermark names `appid`.
    pub fn decrypt(&self, keys: &[SessionKey], appid: &str) -> Result<String, AuthError> {
        let (text, json) = keys
            .iter()
            .find_map(|key| self.decrypt_with(key))
            .ok_or(AuthError::SessionKeyStale)?;
        let watermark = json
            .get("watermark")
            .and_then(|w| w.get("appid"))
            .and_then(serde_json::Value::as_str);
        if watermark != Some(appid) {
            return Err(AuthError::WatermarkMismatch);
        }
        Ok(text)
    }

    /// The plaintext and its parsed form, when `key` gives valid PKCS#7 padding and a UTF-8
    /// JSON object (a wrong key gives valid padding about once in 256 tries, and JSON never).
    fn decrypt_with(&self, key: &SessionKey) -> Option<(String, serde_json::Value)> {
        let plain = cbc::Decryptor::<Aes128>::new(key.expose().into(), (&self.iv).into())
            .decrypt_padded_vec_mut::<Pkcs7>(&self.ciphertext)
            .ok()?;
        let text = String::from_utf8(plain).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json.is_object().then_some((text, json))
    }
}

#[cfg(test)]
mod tests {
    use cbc::cipher::BlockEncryptMut as _;

    use super::*;

    /// WeChat's official test vector, from the mini-program documentation's "signature"
    /// page and its downloadable decryption samples (WXBizDataCrypt). Copied here from the
    /// SDK tests that carry it verbatim: binarywang/WxJava
    /// `weixin-java-miniapp/src/test/java/cn/binarywang/wx/miniapp/util/crypt/WxMaCryptUtilsTest.java`
    /// (`testDecryptAnotherWay`) and w7corp/easywechat `tests/MiniApp/DecryptorTest.php`
    /// (`test_it_can_decrypt_message`, which also asserts the openId and unionId below).
    const OFFICIAL_APPID: &str = "wx4f4bc4dec97d474b";
    const OFFICIAL_SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const OFFICIAL_IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const OFFICIAL_ENCRYPTED_DATA: &str = concat!(
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

    const APPID: &str = "wx5e1e2e0000000001";

    fn key(b64: &str) -> SessionKey {
        SessionKey::from_base64(b64).expect("a 16-byte key")
    }

    fn key_of(byte: u8) -> SessionKey {
        SessionKey::from_bytes(&[byte; 16]).expect("16 bytes")
    }

    /// What the phone does: AES-128-CBC with PKCS#7, answered as (encryptedData, iv).
    fn encrypt(key: &SessionKey, iv: [u8; 16], plain: &str) -> (String, String) {
        let ct = cbc::Encryptor::<Aes128>::new(key.expose().into(), (&iv).into())
            .encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes());
        (STANDARD.encode(ct), STANDARD.encode(iv))
    }

    fn data(encrypted: &(String, String)) -> EncryptedData {
        EncryptedData::parse(&encrypted.0, &encrypted.1).expect("well-formed")
    }

    fn run_data(appid: &str) -> String {
        format!(
            r#"{{"stepInfoList":[{{"timestamp":1700000000,"step":8421}}],"watermark":{{"timestamp":1700000100,"appid":"{appid}"}}}}"#
        )
    }

    #[test]
    fn the_official_test_vector_decrypts_and_its_watermark_is_checked() {
        let data = EncryptedData::parse(OFFICIAL_ENCRYPTED_DATA, OFFICIAL_IV).expect("valid");
        let keys = [key(OFFICIAL_SESSION_KEY)];

        let text = data.decrypt(&keys, OFFICIAL_APPID).expect("decrypts");

        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(json["openId"], "oGZUI0egBJY1zhBYw2KhdUfwVJJE");
        assert_eq!(json["unionId"], "ocMvos6NjeKLIBqg5Mr9QjxrP1FA");
        assert_eq!(json["nickName"], "Band");
        assert_eq!(json["watermark"]["appid"], OFFICIAL_APPID);
        assert_eq!(json["watermark"]["timestamp"], 1_477_314_187);
        // The same data for another app: it decrypts, but is not ours.
        assert!(matches!(
            data.decrypt(&keys, APPID),
            Err(AuthError::WatermarkMismatch)
        ));
    }

    #[test]
    fn the_newest_key_is_tried_then_the_previous_one() {
        let (newest, previous, older) = (key_of(3), key_of(2), key_of(1));
        let held = [newest.clone(), previous.clone()];
        for (k, iv) in [(&newest, [7; 16]), (&previous, [8; 16])] {
            let text = data(&encrypt(k, iv, &run_data(APPID)))
                .decrypt(&held, APPID)
                .expect("a held key decrypts");
            assert_eq!(text, run_data(APPID), "the plaintext exactly as encrypted");
        }
        // Encrypted with a key replaced two rotations ago: stale, whatever the watermark.
        for appid in [APPID, "wx_other_app"] {
            let old = data(&encrypt(&older, [9; 16], &run_data(appid)));
            assert!(matches!(
                old.decrypt(&held, APPID),
                Err(AuthError::SessionKeyStale)
            ));
        }
        // No key held at all.
        let any = data(&encrypt(&newest, [1; 16], &run_data(APPID)));
        assert!(matches!(
            any.decrypt(&[], APPID),
            Err(AuthError::SessionKeyStale)
        ));
    }

    #[test]
    fn stale_and_watermark_mismatch_are_told_apart() {
        let k = key_of(5);
        let held = [k.clone()];
        // Decrypts, but made for another app, or with no watermark at all.
        for plain in [
            run_data("wx_another_app_id0"),
            r#"{"openGId":"tGxxxx"}"#.to_owned(),
            r#"{"watermark":{"appid":42}}"#.to_owned(),
        ] {
            let d = data(&encrypt(&k, [0; 16], &plain));
            assert!(
                matches!(d.decrypt(&held, APPID), Err(AuthError::WatermarkMismatch)),
                "{plain}"
            );
        }
        // The right key, but what comes out is not a JSON object: no key of ours made it.
        for plain in ["not json at all", "[1,2,3]", "\"text\""] {
            let d = data(&encrypt(&k, [0; 16], plain));
            assert!(
                matches!(d.decrypt(&held, APPID), Err(AuthError::SessionKeyStale)),
                "{plain}"
            );
        }
    }

    #[test]
    fn bad_pkcs7_padding_is_stale_not_a_crash() {
        let k = key_of(6);
        let (ct, iv) = encrypt(&k, [4; 16], &run_data(APPID));
        let mut bytes = STANDARD.decode(&ct).expect("base64");
        // Flipping a bit of the next-to-last block garbles the last block's padding.
        let at = bytes.len() - 17;
        bytes[at] ^= 0x01;
        let tampered = EncryptedData::parse(&STANDARD.encode(&bytes), &iv).expect("well-formed");
        assert!(matches!(
            tampered.decrypt(std::slice::from_ref(&k), APPID),
            Err(AuthError::SessionKeyStale)
        ));
        // A padding byte of 0, or larger than a block, is invalid PKCS#7 too.
        for last in [0u8, 17] {
            let mut block = [last; 16];
            block[0] = b'{';
            let ct = cbc::Encryptor::<Aes128>::new(k.expose().into(), (&[0u8; 16]).into())
                .encrypt_padded_vec_mut::<cbc::cipher::block_padding::NoPadding>(&block);
            let d = EncryptedData::parse(&STANDARD.encode(ct), &STANDARD.encode([0u8; 16]))
                .expect("well-formed");
            assert!(matches!(
                d.decrypt(std::slice::from_ref(&k), APPID),
                Err(AuthError::SessionKeyStale)
            ));
        }
    }

    #[test]
    fn malformed_input_names_its_field() {
        let ok_iv = STANDARD.encode([0u8; 16]);
        let ok_data = STANDARD.encode([0u8; 32]);
        let cases = [
            ("", ok_iv.as_str(), "encrypted_data"),
            ("not base64!", ok_iv.as_str(), "encrypted_data"),
            ("AAAA", ok_iv.as_str(), "encrypted_data"), // 3 bytes
            (
                &STANDARD.encode([0u8; 15]),
                ok_iv.as_str(),
                "encrypted_data",
            ),
            (
                &STANDARD.encode([0u8; 17]),
                ok_iv.as_str(),
                "encrypted_data",
            ),
            (ok_data.as_str(), "", "iv"),
            (ok_data.as_str(), "???", "iv"),
            (ok_data.as_str(), &STANDARD.encode([0u8; 15]), "iv"),
            (ok_data.as_str(), &STANDARD.encode([0u8; 24]), "iv"),
            (ok_data.as_str(), "r7BXXKkLb8qrSNn05n0qiA", "iv"), // padding missing
        ];
        for (encrypted_data, iv, field) in cases {
            let err = EncryptedData::parse(encrypted_data, iv)
                .expect_err(&format!("{encrypted_data:?} / {iv:?}"));
            assert_eq!(err.field, field, "{encrypted_data:?} / {iv:?}");
        }
        let long = "A".repeat(MAX_ENCRYPTED_DATA_CHARS + 4);
        assert_eq!(
            EncryptedData::parse(&long, &ok_iv)
                .expect_err("too long")
                .field,
            "encrypted_data"
        );
        assert!(EncryptedData::parse(&ok_data, &ok_iv).is_ok());
    }

    #[test]
    fn debug_output_shows_no_bytes() {
        let d = EncryptedData::parse(OFFICIAL_ENCRYPTED_DATA, OFFICIAL_IV).expect("valid");
        let shown = format!("{d:?}");
        assert!(!shown.contains("CiyLU1Aw"), "{shown}");
        assert!(shown.contains("len"), "{shown}");
    }
}
