//! The simulated WeChat users of the one app, each with exactly one current session_key, and
//! `GET /sim/users/{openid}`. A login (`POST /sim/login-codes`) and `resetusersessionkey` rotate
//! the key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::control::ControlError;
use super::ids::{self, RandomError};
use super::state::SimState;

#[derive(Debug)]
pub(crate) struct User {
    openid: String,
    unionid: Option<String>,
    session_key: String,
    /// Every session_key this user had before the current one, oldest first.
    previous_session_keys: Vec<String>,
}

impl User {
    pub(crate) fn openid(&self) -> &str {
        &self.openid
    }

    pub(crate) fn unionid(&self) -> Option<&str> {
        self.unionid.as_deref()
    }

    pub(crate) fn session_key(&self) -> &str {
        &self.session_key
    }
}

/// What a login does to the user's unionid.
#[derive(Debug)]
pub(crate) enum UnionidChange {
    /// Leave it as it is (none for a new user).
    Keep,
    /// Set it to this one.
    Set(String),
    /// Give the user a random one unless it already has one.
    EnsureOne,
}

#[derive(Debug, Default)]
pub(crate) struct Users {
    by_openid: HashMap<String, User>,
}

impl Users {
    pub(crate) fn get(&self, openid: &str) -> Option<&User> {
        self.by_openid.get(openid)
    }

    /// What `wx.login()` does to a user: creates it when `openid` is `None` or unknown, and
    /// gives it a fresh session_key, the current one moving to its history; with
    /// `keep_session_key`, a known user keeps its current key (WeChat *may* rotate at a
    /// login, WECHAT.md §2; a new user always gets one).
    pub(crate) fn log_in(
        &mut self,
        openid: Option<String>,
        unionid: UnionidChange,
        keep_session_key: bool,
    ) -> Result<&User, RandomError> {
        // Every random value first, so that a failure leaves the user as it was.
        let openid = match openid {
            Some(openid) => openid,
            None => loop {
                let openid = ids::user_id()?;
                if !self.by_openid.contains_key(&openid) {
                    break openid;
                }
            },
        };
        let session_key = ids::session_key()?;
        let unionid = match unionid {
            UnionidChange::EnsureOne => match self.get(&openid).and_then(User::unionid) {
                Some(_) => None,
                None => Some(ids::user_id()?),
            },
            UnionidChange::Set(unionid) => Some(unionid),
            UnionidChange::Keep => None,
        };

        let user = match self.by_openid.entry(openid) {
            Entry::Occupied(entry) => {
                let user = entry.into_mut();
                if !keep_session_key {
                    let previous = std::mem::replace(&mut user.session_key, session_key);
                    user.previous_session_keys.push(previous);
                }
                user
            }
            Entry::Vacant(entry) => {
                let openid = entry.key().clone();
                entry.insert(User {
                    openid,
                    unionid: None,
                    session_key,
                    previous_session_keys: Vec::new(),
                })
            }
        };
        if unionid.is_some() {
            user.unionid = unionid;
        }
        Ok(user)
    }
}

impl Users {
    /// Gives the user `openid` a fresh session_key, the current one moving to its history, as
    /// resetusersessionkey does; `None` for an unknown user.
    pub(crate) fn rotate_session_key(
        &mut self,
        openid: &str,
    ) -> Result<Option<&User>, RandomError> {
        if !self.by_openid.contains_key(openid) {
            return Ok(None);
        }
        let session_key = ids::session_key()?;
        Ok(self.by_openid.get_mut(openid).map(|user| {
            let previous = std::mem::replace(&mut user.session_key, session_key);
            user.previous_session_keys.push(previous);
            &*user
        }))
    }
}

pub(crate) fn router() -> Router<SimState> {
    Router::new().route("/sim/users/{openid}", get(user))
}

#[derive(Debug, Serialize)]
struct UserAnswer {
    openid: String,
    unionid: Option<String>,
    session_key: String,
    /// Newest first.
    previous_session_keys: Vec<String>,
}

async fn user(
    State(state): State<SimState>,
    Path(openid): Path<String>,
) -> Result<Json<UserAnswer>, ControlError> {
    state.with_world(|world| {
        let user = world
            .users
            .get(&openid)
            .ok_or_else(|| ControlError::NotFound(format!("no user with openid {openid:?}")))?;
        Ok(Json(UserAnswer {
            openid: user.openid.clone(),
            unionid: user.unionid.clone(),
            session_key: user.session_key.clone(),
            previous_session_keys: user.previous_session_keys.iter().rev().cloned().collect(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_without_openid_creates_a_user_without_unionid() {
        let mut users = Users::default();
        let user = users
            .log_in(None, UnionidChange::Keep, false)
            .expect("random");
        assert!(user.openid().starts_with('o'));
        assert_eq!(user.unionid(), None);
        assert!(user.previous_session_keys.is_empty());
    }

    #[test]
    fn each_login_rotates_the_session_key_and_keeps_the_old_ones() {
        let mut users = Users::default();
        let first = users
            .log_in(Some("oAlice".into()), UnionidChange::Keep, false)
            .expect("random")
            .session_key()
            .to_owned();
        let second = users
            .log_in(Some("oAlice".into()), UnionidChange::Keep, false)
            .expect("random")
            .session_key()
            .to_owned();
        let user = users
            .log_in(Some("oAlice".into()), UnionidChange::Keep, false)
            .expect("random");
        assert_ne!(user.session_key(), second);
        assert_eq!(user.previous_session_keys, [first, second]);
    }

    #[test]
    fn a_login_that_keeps_the_session_key_leaves_key_and_history_alone() {
        let mut users = Users::default();
        let first = users
            .log_in(Some("oErin".into()), UnionidChange::Keep, true)
            .expect("random")
            .session_key()
            .to_owned();
        let user = users
            .log_in(Some("oErin".into()), UnionidChange::Keep, true)
            .expect("random");
        assert_eq!(user.session_key(), first);
        assert!(user.previous_session_keys.is_empty());
        let user = users
            .log_in(Some("oErin".into()), UnionidChange::Keep, false)
            .expect("random");
        assert_ne!(user.session_key(), first);
        assert_eq!(user.previous_session_keys, [first]);
    }

    #[test]
    fn rotating_replaces_the_key_and_keeps_the_old_one() {
        let mut users = Users::default();
        let first = users
            .log_in(Some("oDave".into()), UnionidChange::Keep, false)
            .expect("random")
            .session_key()
            .to_owned();
        let user = users
            .rotate_session_key("oDave")
            .expect("random")
            .expect("a known user");
        assert_ne!(user.session_key(), first);
        assert_eq!(user.previous_session_keys, [first]);
        assert!(
            users
                .rotate_session_key("oNobody")
                .expect("random")
                .is_none()
        );
    }

    #[test]
    fn ensure_one_keeps_an_existing_unionid_and_set_replaces_it() {
        let mut users = Users::default();
        users
            .log_in(Some("oBob".into()), UnionidChange::Set("oU1".into()), false)
            .expect("random");
        let user = users
            .log_in(Some("oBob".into()), UnionidChange::EnsureOne, false)
            .expect("random");
        assert_eq!(user.unionid(), Some("oU1"));
        let user = users
            .log_in(Some("oBob".into()), UnionidChange::Set("oU2".into()), false)
            .expect("random");
        assert_eq!(user.unionid(), Some("oU2"));
        let user = users
            .log_in(Some("oCarol".into()), UnionidChange::EnsureOne, false)
            .expect("random");
        assert!(user.unionid().is_some_and(|u| u.len() == 28));
    }
}
