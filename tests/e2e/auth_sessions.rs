//! Sessions: the policy (multi with N, single, same device), logout, operator revocation,
//! listing, and the timeline with every reason.

use proto::v1::{
    EndReason, ListSessionEventsRequest, ListSessionsRequest, LogoutRequest, RevokeUserRequest,
    SessionEventKind,
};
use tonic::Code;

use crate::common::{reason, tokens, world};

#[tokio::test]
async fn multi_keeps_n_sessions_and_pushes_out_the_oldest() {
    let mut w = world(&[("AUTH_SESSION_POLICY", "multi"), ("AUTH_MAX_SESSIONS", "2")]).await;
    let (minted, first) = w.login_as(None, Some("phone")).await;
    let (_, second) = w.login_as(Some(&minted.openid), Some("tablet")).await;
    let first_access = tokens(first.tokens.as_ref()).0;
    w.verify(&first_access).await.expect("two fit");

    let (_, third) = w.login_as(Some(&minted.openid), Some("laptop")).await;

    assert_eq!(w.verify_refused(&first_access).await, "SESSION_REPLACED");
    let second_access = tokens(second.tokens.as_ref()).0;
    w.verify(&second_access).await.expect("second kept");
    let third_access = tokens(third.tokens.as_ref()).0;
    let sessions = w
        .client
        .list_sessions(ListSessionsRequest {
            access_token: third_access,
        })
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 2);
    // Newest first, the caller's marked.
    assert_eq!(sessions[0].session_id, third.session_id);
    assert!(sessions[0].current);
    assert_eq!(sessions[1].session_id, second.session_id);
    assert!(!sessions[1].current);
    assert_eq!(
        sessions[0].device.as_ref().map(|d| d.id.as_str()),
        Some("laptop")
    );
    // The refresh token of a replaced session is refused the same way.
    let err = w
        .refresh(&tokens(first.tokens.as_ref()).1)
        .await
        .expect_err("replaced");
    assert_eq!(reason(&err), "SESSION_REPLACED");
}

#[tokio::test]
async fn multi_default_allows_five() {
    let mut w = world(&[]).await;
    let (minted, first) = w.login_as(None, Some("d0")).await;
    for i in 1..5 {
        w.login_as(Some(&minted.openid), Some(&format!("d{i}")))
            .await;
    }
    w.verify(&tokens(first.tokens.as_ref()).0)
        .await
        .expect("five fit");
    w.login_as(Some(&minted.openid), Some("d5")).await;
    assert_eq!(
        w.verify_refused(&tokens(first.tokens.as_ref()).0).await,
        "SESSION_REPLACED"
    );
}

#[tokio::test]
async fn single_policy_ends_every_other_session() {
    let mut w = world(&[("AUTH_SESSION_POLICY", "single")]).await;
    let (minted, a) = w.login_as(None, Some("phone")).await;
    let (_, b) = w.login_as(Some(&minted.openid), None).await;
    let (_, c) = w.login_as(Some(&minted.openid), Some("tablet")).await;

    assert_eq!(
        w.verify_refused(&tokens(a.tokens.as_ref()).0).await,
        "SESSION_REPLACED"
    );
    assert_eq!(
        w.verify_refused(&tokens(b.tokens.as_ref()).0).await,
        "SESSION_REPLACED"
    );
    w.verify(&tokens(c.tokens.as_ref()).0)
        .await
        .expect("newest lives");
}

#[tokio::test]
async fn a_login_from_the_same_device_replaces_that_devices_session() {
    let mut w = world(&[]).await;
    let (minted, first) = w.login_as(None, Some("phone")).await;
    let (_, other) = w.login_as(Some(&minted.openid), Some("tablet")).await;

    let (_, again) = w.login_as(Some(&minted.openid), Some("phone")).await;

    assert_eq!(
        w.verify_refused(&tokens(first.tokens.as_ref()).0).await,
        "SESSION_REPLACED"
    );
    w.verify(&tokens(other.tokens.as_ref()).0)
        .await
        .expect("the other device is untouched");
    let sessions = w
        .client
        .list_sessions(ListSessionsRequest {
            access_token: tokens(again.tokens.as_ref()).0,
        })
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 2);
    // The timeline names the device that replaced it.
    let events = w.events(&minted.openid).await;
    let end = events
        .iter()
        .find(|e| e.session_id == first.session_id && e.kind() == SessionEventKind::End)
        .expect("end of the first session");
    assert_eq!(end.end_reason(), EndReason::Replaced);
    assert_eq!(end.replaced_by_device_id, "phone");
    assert_eq!(end.replaced_by_session_id, again.session_id);
}

#[tokio::test]
async fn logout_ends_one_session_and_logout_all_ends_every_one() {
    let mut w = world(&[]).await;
    let (minted, a) = w.login_as(None, Some("a")).await;
    let (_, b) = w.login_as(Some(&minted.openid), Some("b")).await;
    let (_, c) = w.login_as(Some(&minted.openid), Some("c")).await;
    let (a, b, c) = (
        tokens(a.tokens.as_ref()).0,
        tokens(b.tokens.as_ref()).0,
        tokens(c.tokens.as_ref()).0,
    );

    let one = w
        .client
        .logout(LogoutRequest {
            access_token: a.clone(),
            all: false,
        })
        .await
        .expect("logout")
        .into_inner();
    assert_eq!(one.revoked_sessions, 1);
    assert_eq!(w.verify_refused(&a).await, "TOKEN_REVOKED");
    w.verify(&b).await.expect("b still in");

    let all = w
        .client
        .logout(LogoutRequest {
            access_token: b.clone(),
            all: true,
        })
        .await
        .expect("logout all")
        .into_inner();
    assert_eq!(all.revoked_sessions, 2);
    assert_eq!(w.verify_refused(&b).await, "TOKEN_REVOKED");
    assert_eq!(w.verify_refused(&c).await, "TOKEN_REVOKED");
    // A logged-out token cannot log out again.
    let err = w
        .client
        .logout(LogoutRequest {
            access_token: c,
            all: true,
        })
        .await
        .expect_err("already out");
    assert_eq!(reason(&err), "TOKEN_REVOKED");

    let events = w.events(&minted.openid).await;
    let reasons: Vec<EndReason> = events
        .iter()
        .filter(|e| e.kind() == SessionEventKind::End)
        .map(|e| e.end_reason())
        .collect();
    assert_eq!(
        reasons,
        vec![
            EndReason::LogoutAll,
            EndReason::LogoutAll,
            EndReason::Logout
        ]
    );
}

#[tokio::test]
async fn revoke_user_ends_every_session_at_once() {
    let mut w = world(&[]).await;
    let (minted, a) = w.login_as(None, Some("a")).await;
    let (_, b) = w.login_as(Some(&minted.openid), Some("b")).await;

    let answer = w
        .client
        .revoke_user(RevokeUserRequest {
            openid: minted.openid.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();

    assert_eq!(answer.revoked_sessions, 2);
    for t in [a, b] {
        let (access, refresh) = tokens(t.tokens.as_ref());
        assert_eq!(w.verify_refused(&access).await, "TOKEN_REVOKED");
        let err = w.refresh(&refresh).await.expect_err("revoked");
        assert_eq!(reason(&err), "TOKEN_REVOKED");
    }
    // Revoking again ends nothing more; an unknown user is NOT_FOUND.
    let again = w
        .client
        .revoke_user(RevokeUserRequest {
            openid: minted.openid.clone(),
        })
        .await
        .expect("revoke again")
        .into_inner();
    assert_eq!(again.revoked_sessions, 0);
    let err = w
        .client
        .revoke_user(RevokeUserRequest {
            openid: "oNoSuchUser0000000000000000".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = w
        .client
        .revoke_user(RevokeUserRequest {
            openid: String::new(),
        })
        .await
        .expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument);
    // A new login works after a revocation.
    w.login_as(Some(&minted.openid), None).await;
}

#[tokio::test]
async fn the_timeline_lists_logins_refreshes_and_ends_newest_first_in_pages() {
    let mut w = world(&[]).await;
    let (minted, a) = w.login_as(None, Some("a")).await;
    w.refresh(&tokens(a.tokens.as_ref()).1)
        .await
        .expect("refresh");
    w.client
        .revoke_user(RevokeUserRequest {
            openid: minted.openid.clone(),
        })
        .await
        .expect("revoke");

    let page = |size: u32, token: String| ListSessionEventsRequest {
        openid: minted.openid.clone(),
        page_size: size,
        page_token: token,
    };
    let all = w
        .client
        .list_session_events(page(0, String::new()))
        .await
        .expect("events")
        .into_inner();
    let kinds: Vec<SessionEventKind> = all.events.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        vec![
            SessionEventKind::End,
            SessionEventKind::Refresh,
            SessionEventKind::Login
        ]
    );
    assert_eq!(all.events[0].end_reason(), EndReason::RevokedByOperator);
    assert_eq!(
        all.events[2].device.as_ref().map(|d| d.platform.as_str()),
        Some("ios")
    );

    // Two pages of two and one.
    let first = w
        .client
        .list_session_events(page(2, String::new()))
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.events.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = w
        .client
        .list_session_events(page(2, first.next_page_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.events[0].kind(), SessionEventKind::Login);

    // Bad paging input and unknown users.
    let err = w
        .client
        .list_session_events(page(501, String::new()))
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = w
        .client
        .list_session_events(page(10, "not-a-token".into()))
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = w
        .client
        .list_session_events(ListSessionEventsRequest {
            openid: "oUnknown".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), Code::NotFound);
}
