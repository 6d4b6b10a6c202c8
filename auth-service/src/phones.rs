//! The users' phone numbers, kept in memory so that `Verify` with `include_phone` (every
//! `GET /v1/me`) costs no database read and no decryption.
//!
//! With SQLite this process is the database's only writer (one replica). With PostgreSQL
//! another replica may change a number, so an entry is kept with the stamp Redis gave the
//! number when it was read ([`PhoneStamp`]), and used only while Redis gives that same
//! stamp: a write anywhere replaces it first. PostgreSQL without Redis keeps nothing: every
//! read goes to the database.
//!
//! Within the process, [`shared::Kept`]'s rule applies: a read is kept only if no write of a
//! number overlapped it, and a write drops its user's entry when it ends. Writes are rare
//! (a user confirms a number once or twice), so a write anywhere skipping the keeping of
//! reads elsewhere costs nothing that matters.
//!
//! The numbers are personal data: they stay in this map (bounded, S3-FIFO eviction by
//! `quick_cache`) and out of `Debug` output and logs.

use crate::wechat::PhoneNumber;

/// The bounded map of openid → kept number (`None`: the user has none); with a capacity of
/// 0 it keeps nothing. The rule is [`shared::Kept`]'s.
pub type KeptPhones = shared::Kept<Option<PhoneNumber>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PhoneStamp;

    fn number(n: &str) -> Option<PhoneNumber> {
        Some(PhoneNumber {
            phone_number: n.into(),
            pure_phone_number: n.into(),
            country_code: "86".into(),
        })
    }

    #[test]
    fn a_read_with_no_write_around_it_is_kept() {
        let kept = KeptPhones::new(10);
        assert_eq!(kept.get("o", &PhoneStamp::Local), None);

        let read = kept.read_started();
        kept.read_done(read, "o", None, &number("1"));
        let none = kept.read_started();
        kept.read_done(none, "p", None, &None);

        assert_eq!(kept.get("o", &PhoneStamp::Local), Some(number("1")));
        assert_eq!(
            kept.get("p", &PhoneStamp::Local),
            Some(None),
            "\"no number\" is kept too"
        );
    }

    #[test]
    fn a_read_that_overlapped_a_write_is_not_kept() {
        let kept = KeptPhones::new(10);

        // A write starts, then a read (which may see the old number or the new one).
        let write = kept.write_started("o");
        let during = kept.read_started();
        kept.read_done(during, "o", None, &number("old"));
        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "read while a write ran"
        );

        // A read starts, then a write starts and ends before the read is done.
        let before = kept.read_started();
        drop(write);
        let other = kept.write_started("someone else");
        drop(other);
        kept.read_done(before, "o", None, &number("old"));
        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "a write ran during the read"
        );

        // Nothing overlaps: kept.
        let after = kept.read_started();
        kept.read_done(after, "o", None, &number("new"));
        assert_eq!(kept.get("o", &PhoneStamp::Local), Some(number("new")));
    }

    #[test]
    fn a_stamped_entry_is_used_only_under_its_own_stamp() {
        let kept = KeptPhones::new(10);
        let stamp = |s: &str| PhoneStamp::Current(s.into());
        let read = kept.read_started();
        kept.read_done(read, "o", Some("s1".into()), &number("1"));

        assert_eq!(kept.get("o", &stamp("s1")), Some(number("1")));
        assert_eq!(kept.get("o", &stamp("s2")), None, "another replica wrote");
        assert_eq!(kept.get("o", &PhoneStamp::Unusable), None, "a write runs");
        assert_eq!(
            kept.get("o", &PhoneStamp::Missing),
            None,
            "the stamp lapsed"
        );
        assert_eq!(kept.get("o", &PhoneStamp::Local), None);

        let read = kept.read_started();
        kept.read_done(read, "o", None, &number("2"));
        assert_eq!(
            kept.get("o", &stamp("s1")),
            None,
            "a local entry has no stamp"
        );
    }

    #[test]
    fn a_write_drops_its_users_entry_when_it_ends() {
        let kept = KeptPhones::new(10);
        for openid in ["o", "p"] {
            let read = kept.read_started();
            kept.read_done(read, openid, None, &None);
        }

        drop(kept.write_started("o"));

        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "the writer's user is read again"
        );
        assert_eq!(
            kept.get("p", &PhoneStamp::Local),
            Some(None),
            "another user's entry stays"
        );
    }

    #[test]
    fn a_capacity_of_zero_keeps_nothing_and_the_map_is_bounded() {
        let off = KeptPhones::new(0);
        let read = off.read_started();
        off.read_done(read, "o", None, &number("1"));
        assert_eq!(off.get("o", &PhoneStamp::Local), None);
        drop(off.write_started("o"));

        let kept = KeptPhones::new(100);
        for i in 0..1_000 {
            let read = kept.read_started();
            kept.read_done(read, &format!("o{i}"), None, &None);
        }
        assert!(kept.len() <= 100, "{} entries kept", kept.len());
    }
}
