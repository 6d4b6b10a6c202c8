//! Tokens: Verify's verdicts, refresh rotation, the grace window, reuse, expiry.

use std::time::Duration;

use proto::v1::verify_batch_result::Result as Answer;
use proto::v1::{
    ListSessionsRequest, LogoutRequest, RefreshRequest, SessionEventKind, VerifyBatchItem,
    VerifyBatchRequest, VerifyRequest,
};
use tonic::Code;

use crate::common::{meta, reason, tokens, world};

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

fn batch_item(access_token: &str, request_id: &str) -> VerifyBatchItem {
    VerifyBatchItem {
        request: Some(VerifyRequest {
            access_token: access_token.to_owned(),
            include_phone: false,
        }),
        request_id: request_id.to_owned(),
    }
}

#[tokio::test]
async fn verify_batch_answers_each_item_as_verify_alone_would() {
    // Arrange: two users, one of them with a second session that is logged out
    let mut w = world(&[]).await;
    let (_, a) = w.login_as(None, Some("a")).await;
    let (_, b) = w.login_as(None, Some("b")).await;
    let (_, b_out) = w.login_as(Some(&b.openid), Some("b2")).await;
    let (a_access, a_refresh) = tokens(a.tokens.as_ref());
    let (b_access, _) = tokens(b.tokens.as_ref());
    let (b_out_access, _) = tokens(b_out.tokens.as_ref());
    w.client
        .logout(LogoutRequest {
            access_token: b_out_access.clone(),
            all: false,
        })
        .await
        .expect("logout");
    let asked = [
        a_access.as_str(),
        "",
        "wxa_short",
        b_access.as_str(),
        b_out_access.as_str(),
        a_refresh.as_str(),
        a_access.as_str(),
    ];

    // Act
    let items = asked
        .iter()
        .enumerate()
        .map(|(i, t)| batch_item(t, &format!("req-{i}")))
        .collect();
    let results = w
        .client
        .verify_batch(VerifyBatchRequest { items })
        .await
        .expect("VerifyBatch")
        .into_inner()
        .results;

    // Assert: one result per item, in order, each what Verify alone answers
    assert_eq!(results.len(), asked.len());
    for (token, result) in asked.iter().zip(results) {
        let alone = w.verify(token).await;
        match (result.result, alone) {
            (Some(Answer::Identity(got)), Ok(want)) => {
                assert_eq!(got.openid, want.openid);
                assert_eq!(got.session_id, want.session_id);
                assert_eq!(got.expires_at, want.expires_at);
            }
            (Some(Answer::Error(got)), Err(want)) => {
                let got = got.into_status();
                assert_eq!(got.code(), want.code());
                assert_eq!(got.message(), want.message());
                assert_eq!(reason(&got), reason(&want));
            }
            (got, want) => panic!("batch answered {got:?}, Verify alone {want:?}"),
        }
    }
    let openids = [&a.openid, &b.openid];
    assert_ne!(openids[0], openids[1]);
    assert_eq!(w.verify(&a_access).await.expect("a").openid, a.openid);
    assert_eq!(w.verify(&b_access).await.expect("b").openid, b.openid);
    assert_eq!(w.verify_refused(&b_out_access).await, "TOKEN_REVOKED");
}

#[tokio::test]
async fn verify_batch_refuses_an_empty_or_oversized_batch_whole() {
    let mut w = world(&[]).await;
    let (_, a) = w.login_as(None, None).await;
    let (access, _) = tokens(a.tokens.as_ref());
    for n in [0, 1001] {
        let items = (0..n)
            .map(|i| batch_item(&access, &format!("r{i}")))
            .collect();
        let err = w
            .client
            .verify_batch(VerifyBatchRequest { items })
            .await
            .expect_err("refused whole");
        assert_eq!(err.code(), Code::InvalidArgument, "{n}: {err:?}");
        assert_eq!(reason(&err), "INVALID_ARGUMENT", "{n}");
        assert_eq!(meta(&err, "field").as_deref(), Some("items"), "{n}");
    }
    // The most it takes is answered.
    let items = (0..1000)
        .map(|i| batch_item(&access, &format!("r{i}")))
        .collect();
    let results = w
        .client
        .verify_batch(VerifyBatchRequest { items })
        .await
        .expect("1000 items")
        .into_inner()
        .results;
    assert_eq!(results.len(), 1000);
    assert!(
        results
            .iter()
            .all(|r| matches!(&r.result, Some(Answer::Identity(id)) if id.openid == a.openid))
    );
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
    // The 1 s TTL, not the default: `expires_in` is counted when the reply is built and
    // rounded to the nearest second, so a slow reply may already say 0.
    let expires_in = login.tokens.as_ref().map(|t| t.expires_in);
    assert!(matches!(expires_in, Some(0..=1)), "{expires_in:?}");

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

/// What a caller can see of the once-a-minute touch: Verify right after login leaves
/// `last_active_at` where the login put it. (How many writes Verify sends is counted by
/// auth-service's own unit test: the store's guard would hide extra ones from this test.)
#[tokio::test]
async fn verify_right_after_login_leaves_last_active_at_unchanged() {
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
    // A touch is written off the call's path, by a task of its own, with no signal when it
    // is done: time for one that (wrongly) moved the value to land before it is read.
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
