//! The simulator's settings, read from the environment.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;

/// Where the simulator listens and the one app it knows.
#[derive(Clone)]
pub struct Settings {
    /// `WECHAT_SIM_ADDR`.
    pub addr: SocketAddr,
    /// `WECHAT_SIM_APPID`.
    pub appid: String,
    /// `WECHAT_SIM_SECRET`.
    pub secret: String,
}

/// A setting that is present but malformed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value is not valid Unicode.
    #[error("{name} is not valid Unicode")]
    NotUnicode {
        /// The variable's name.
        name: &'static str,
    },
    /// The value does not have the expected form.
    #[error("{name}={value:?} is not {expected}")]
    Invalid {
        /// The variable's name.
        name: &'static str,
        /// What it was set to.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
}

impl Settings {
    pub const DEFAULT_ADDR: &str = "127.0.0.1:9300";
    pub const DEFAULT_APPID: &str = "wx00000000000000d1";
    pub const DEFAULT_SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// Reads `WECHAT_SIM_ADDR`, `WECHAT_SIM_APPID` and `WECHAT_SIM_SECRET`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the settings through `lookup`, which answers a variable's value by its name.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let read = |name: &'static str, default: &str| -> Result<String, ConfigError> {
            match lookup(name) {
                None => Ok(default.to_owned()),
                Some(value) => value
                    .into_string()
                    .map_err(|_| ConfigError::NotUnicode { name }),
            }
        };

        let addr = read("WECHAT_SIM_ADDR", Self::DEFAULT_ADDR)?;
        let addr = addr.parse().map_err(|_| ConfigError::Invalid {
            name: "WECHAT_SIM_ADDR",
            value: addr.clone(),
            expected: "an IP address and port such as 127.0.0.1:9300",
        })?;

        let appid = read("WECHAT_SIM_APPID", Self::DEFAULT_APPID)?;
        if appid.is_empty() || !appid.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConfigError::Invalid {
                name: "WECHAT_SIM_APPID",
                value: appid,
                expected: "a non-empty string of ASCII letters and digits",
            });
        }

        let secret = read("WECHAT_SIM_SECRET", Self::DEFAULT_SECRET)?;
        if secret.is_empty() || !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::Invalid {
                name: "WECHAT_SIM_SECRET",
                // Whatever it is, it is not echoed.
                value: "<hidden>".to_owned(),
                expected: "a non-empty string of printable ASCII without spaces",
            });
        }

        Ok(Self {
            addr,
            appid,
            secret,
        })
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("addr", &self.addr)
            .field("appid", &self.appid)
            .field("secret", &"<hidden>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(*v))
        })
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s = settings(&[]).expect("defaults are valid");
        assert_eq!(s.addr.to_string(), "127.0.0.1:9300");
        assert_eq!(s.appid, "wx00000000000000d1");
        assert_eq!(s.secret, "0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn values_from_the_environment_win() {
        let s = settings(&[
            ("WECHAT_SIM_ADDR", "127.0.0.1:0"),
            ("WECHAT_SIM_APPID", "wx1234"),
            ("WECHAT_SIM_SECRET", "s3cret"),
        ])
        .expect("valid settings");
        assert_eq!(s.addr.port(), 0);
        assert_eq!(s.appid, "wx1234");
        assert_eq!(s.secret, "s3cret");
    }

    #[test]
    fn a_malformed_address_is_refused_by_name() {
        let err = settings(&[("WECHAT_SIM_ADDR", "localhost")]).expect_err("not an address");
        assert!(err.to_string().contains("WECHAT_SIM_ADDR"), "{err}");
    }

    #[test]
    fn an_empty_appid_or_secret_is_refused_by_name() {
        let err = settings(&[("WECHAT_SIM_APPID", "")]).expect_err("empty appid");
        assert!(err.to_string().contains("WECHAT_SIM_APPID"), "{err}");
        let err = settings(&[("WECHAT_SIM_SECRET", "a b")]).expect_err("a space in the secret");
        assert!(err.to_string().contains("WECHAT_SIM_SECRET"), "{err}");
        assert!(
            !err.to_string().contains("a b"),
            "the secret is not echoed: {err}"
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let s = settings(&[]).expect("defaults are valid");
        assert!(!format!("{s:?}").contains(&s.secret));
    }
}
