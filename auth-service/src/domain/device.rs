//! The device a session was opened from, as the mini-program reports it.

use super::Invalid;

/// A checked device description; every part optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    id: Option<String>,
    platform: Option<String>,
    model: Option<String>,
}

impl Device {
    /// Checks each part's length and characters; an empty part means "not given".
    pub fn parse(id: &str, platform: &str, model: &str) -> Result<Self, Invalid> {
        Ok(Self {
            id: part("device.id", id, 128)?,
            platform: part("device.platform", platform, 32)?,
            model: part("device.model", model, 128)?,
        })
    }

    /// Rebuilds a device read back from the store (already checked when it was written).
    pub fn from_stored(
        id: Option<String>,
        platform: Option<String>,
        model: Option<String>,
    ) -> Self {
        Self {
            id,
            platform,
            model,
        }
    }

    /// The install's stable id, if the mini-program sent one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The platform, if sent.
    pub fn platform(&self) -> Option<&str> {
        self.platform.as_deref()
    }

    /// The model, if sent.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

fn part(field: &'static str, raw: &str, max_chars: usize) -> Result<Option<String>, Invalid> {
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.chars().count() > max_chars {
        return Err(Invalid::new(
            field,
            format!("is longer than {max_chars} characters"),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(Invalid::new(field, "has a control character"));
    }
    Ok(Some(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_parts_are_absent() {
        let d = Device::parse("", "", "").expect("valid");
        assert_eq!(d, Device::default());
    }

    #[test]
    fn keeps_given_parts() {
        let d = Device::parse("dev-1", "ios", "iPhone 15 Pro").expect("valid");
        assert_eq!(d.id(), Some("dev-1"));
        assert_eq!(d.platform(), Some("ios"));
        assert_eq!(d.model(), Some("iPhone 15 Pro"));
    }

    #[test]
    fn names_the_field_at_fault() {
        let err = Device::parse(&"x".repeat(129), "", "").expect_err("too long");
        assert_eq!(err.field, "device.id");
        let err = Device::parse("", "ios\n", "").expect_err("control char");
        assert_eq!(err.field, "device.platform");
        // Characters, not bytes: 128 CJK characters are fine.
        assert!(Device::parse("", "", &"机".repeat(128)).is_ok());
    }
}
