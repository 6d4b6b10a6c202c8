//! Tokens: Verify's verdicts, refresh rotation, the grace window, reuse, expiry.

use std::time::Duration;

use proto::v1::{ListSessionsRequest, RefreshRequest, SessionEventKind};
use tonic::Code;

use crate::common::{reason, tokens, world};

#[tokio::test]
async fn verify_tells_missing_and_garbled_tokens_apart() {
    let mut w = world(&[]).await;
    assert_eq!(w.verify_refused("").await, "TOKEN_MISSING");
    for garbled in [
        "abc",
        "wxa_short",
        "Bearer wxa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        // Well-formed but never issued.
        "wxa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        assert_eq!(
            w.verify_refused(garbled).await,
            "TOKEN_INVALID",
            "{garbled}"
        );
    }
    // A refresh token is not an access token.
    let (_, login) = w.login_as(None, None).await;
    let (_, refresh) = tokens(login.tokens.as_ref());
    assert_eq!(w.verify_refused(&refresh).await, "TOKEN_INVALID");
}

#[tokio::test]
async fn refresh_rotates_and_the_old_refresh_token_gets_the_same_pair_within_grace() {
    let mut w = world(&[]).await;
    let (_, login) = w.login_as(None, None).await;
    let (access1, refresh1) = tokens(login.tokens.as_ref());

    let r1 = w.refresh(&refresh1).await.expect("refresh");
    let (access2, refresh2) = tokens(r1.tokens.as_ref());
    assert_ne!(access2, access1);
    assert_ne!(refresh2, refresh1);
    assert_eq!(r1.session_id, login.session_id);
    assert_eq!(r1.openid, login.openid);
    let id = w.verify(&access2).await.expect("new access token");
    assert_eq!(id.session_id, login.session_id);

    // A client that refreshed twice in parallel: the second answer is the same pair.
    let again = w.refresh(&refresh1).await.expect("within grace");
    assert_eq!(tokens(again.tokens.as_ref()), (access2, refresh2.clone()));

    // The new refresh token rotates in turn.
    let r2 = w.refresh(&refresh2).await.expect("next refresh");
    w.verify(&tokens(r2.tokens.as_ref()).0)
        .await
        .expect("third access token");
}

#[tokio::test]
async fn parallel_refreshes_of_one_token_all_get_one_pair() {
    let mut w = world(&[]).await;
    let (_, login) = w.login_as(None, None).await;
    let (_, refresh) = tokens(login.tokens.as_ref());

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = w.client.clone();
        let t = refresh.clone();
        tasks.push(tokio::spawn(async move {
            c.refresh(RefreshRequest { refresh_token: t }).await
        }));
    }
    let mut pairs = Vec::new();
    for t in tasks {
        let answer = t
            .await
            .expect("task")
            .expect("every refresh succeeds")
            .into_inner();
        pairs.push(tokens(answer.tokens.as_ref()));
    }

    pairs.dedup();
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    w.verify(&pairs[0].0).await.expect("the one pair works");
}

#[tokio::test]
async fn reuse_after_grace_revokes_the_whole_session() {
    let mut w = world(&[("AUTH_REFRESH_GRACE", "1s")]).await;
    let (minted, login) = w.login_as(None, None).await;
    let (_, refresh1) = tokens(login.tokens.as_ref());
    let r = w.refresh(&refresh1).await.expect("refresh");
    let (access2, refresh2) = tokens(r.tokens.as_ref());
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let err = w.refresh(&refresh1).await.expect_err("reuse");

    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    // Every token of the session is dead.
    assert_eq!(w.verify_refused(&access2).await, "TOKEN_REVOKED");
    let err = w
        .refresh(&refresh2)
        .await
        .expect_err("successor is dead too");
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    // And the timeline says why.
    let events = w.events(&minted.openid).await;
    let end = events
        .iter()
        .find(|e| e.kind() == SessionEventKind::End)
        .expect("an end event");
    assert_eq!(end.end_reason(), proto::v1::EndReason::RefreshReused);
}

#[tokio::test]
async fn refresh_refuses_missing_garbled_and_unknown_tokens() {
    let mut w = world(&[]).await;
    for (token, expected) in [
        ("", "TOKEN_MISSING"),
        ("garbage", "TOKEN_INVALID"),
        (
            "wxr_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "TOKEN_INVALID",
        ),
    ] {
        let err = w.refresh(token).await.expect_err(token);
        assert_eq!(reason(&err), expected, "{token}");
    }
    // An access token is not a refresh token.
    let (_, login) = w.login_as(None, None).await;
    let err = w
        .refresh(&tokens(login.tokens.as_ref()).0)
        .await
        .expect_err("access token");
    assert_eq!(reason(&err), "TOKEN_INVALID");
}

#[tokio::test]
async fn expired_tokens_are_told_apart_from_invalid_ones() {
    let mut w = world(&[("AUTH_ACCESS_TTL", "1s"), ("AUTH_REFRESH_TTL", "2s")]).await;
    let (minted, login) = w.login_as(None, None).await;
    let (access, refresh) = tokens(login.tokens.as_ref());
    assert_eq!(login.tokens.as_ref().map(|t| t.expires_in), Some(1));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(w.verify_refused(&access).await, "TOKEN_EXPIRED");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let err = w
        .refresh(&refresh)
        .await
        .expect_err("refresh token expired");
    assert_eq!(reason(&err), "TOKEN_EXPIRED");

    // The session's end is on the timeline as `expired`.
    let events = w.events(&minted.openid).await;
    assert!(
        events
            .iter()
            .any(|e| e.end_reason() == proto::v1::EndReason::Expired),
        "{events:?}"
    );
}

#[tokio::test]
async fn verify_does_not_write_last_active_more_than_once_a_minute() {
    let mut w = world(&[]).await;
    let (_, login) = w.login_as(None, None).await;
    let (access, _) = tokens(login.tokens.as_ref());
    let before = w
        .client
        .list_sessions(ListSessionsRequest {
            access_token: access.clone(),
        })
        .await
        .expect("sessions")
        .into_inner()
        .sessions;

    for _ in 0..5 {
        w.verify(&access).await.expect("verify");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let after = w
        .client
        .list_sessions(ListSessionsRequest {
            access_token: access,
        })
        .await
        .expect("sessions")
        .into_inner()
        .sessions;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].last_active_at, after[0].last_active_at);
    assert_eq!(after[0].last_active_at, after[0].created_at);
}
