//! `ProfileStore`: made on first sight, changed field by field, scoped to the openid.

use api_service::db::Db;
use api_service::profile::{
    AvatarUrl, KeptProfiles, Nickname, PgProfiles, ProfilePatch, ProfileStore as _, Stamps,
};
use secrecy::SecretString;
use shared::Stamp;
use tokio::task::JoinSet;

use crate::support::Backend;

on_every_backend!(
    a_profile_is_made_empty_on_first_sight_and_kept,
    a_change_sets_only_what_it_names_and_none_clears,
    concurrent_first_sights_make_one_profile,
    concurrent_changes_of_different_fields_both_stick,
);

fn nickname(n: &str) -> ProfilePatch {
    ProfilePatch {
        nickname: Some(Some(Nickname::parse(n).expect("nickname"))),
        avatar_url: None,
    }
}

fn avatar(url: &str) -> ProfilePatch {
    ProfilePatch {
        nickname: None,
        avatar_url: Some(Some(AvatarUrl::parse(url).expect("avatar"))),
    }
}

async fn a_profile_is_made_empty_on_first_sight_and_kept(b: Backend) {
    // Act
    let first = b
        .profiles
        .get_or_create("alice")
        .await
        .expect("first sight");
    let again = b.profiles.get_or_create("alice").await.expect("again");

    // Assert
    assert_eq!(first.openid, "alice");
    assert_eq!(
        (first.nickname.as_deref(), first.avatar_url.as_deref()),
        (None, None)
    );
    assert_eq!(first.created_at, first.updated_at);
    assert!(first.created_at > 0);
    assert_eq!(again, first);
}

async fn a_change_sets_only_what_it_names_and_none_clears(b: Backend) {
    // A change to a profile never seen makes it first.
    let named = b
        .profiles
        .update("alice", nickname("微信用户"))
        .await
        .expect("nickname");
    assert_eq!(named.openid, "alice");
    assert_eq!(named.nickname.as_deref(), Some("微信用户"));
    assert_eq!(named.avatar_url, None);
    assert!(named.updated_at >= named.created_at);

    let url = "https://thirdwx.qlogo.cn/mmopen/abc/132";
    let both = b
        .profiles
        .update("alice", avatar(url))
        .await
        .expect("avatar");
    assert_eq!(both.nickname.as_deref(), Some("微信用户"));
    assert_eq!(both.avatar_url.as_deref(), Some(url));
    assert_eq!(both.created_at, named.created_at);
    assert!(both.updated_at >= named.updated_at);

    let cleared = b
        .profiles
        .update(
            "alice",
            ProfilePatch {
                nickname: Some(None),
                avatar_url: None,
            },
        )
        .await
        .expect("clear");
    assert_eq!(cleared.nickname, None);
    assert_eq!(cleared.avatar_url.as_deref(), Some(url));
    assert_eq!(
        b.profiles.get_or_create("alice").await.expect("read back"),
        cleared
    );

    // Nobody else's profile moved.
    let bob = b.profiles.get_or_create("bob").await.expect("bob");
    assert_eq!((bob.nickname, bob.avatar_url), (None, None));
}

async fn concurrent_first_sights_make_one_profile(b: Backend) {
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let profiles = b.profiles.clone();
        tasks.spawn(async move { profiles.get_or_create("newcomer").await });
    }
    let seen: Vec<_> = tasks
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("every first sight succeeds"))
        .collect();
    assert!(seen.iter().all(|p| p == &seen[0]), "{seen:?}");
}

async fn concurrent_changes_of_different_fields_both_stick(b: Backend) {
    let url = "https://example.com/me.png";
    for round in 0..5 {
        let openid = format!("user-{round}");
        let (n, a) = tokio::join!(
            b.profiles.update(&openid, nickname("Zoë")),
            b.profiles.update(&openid, avatar(url)),
        );
        n.expect("nickname");
        a.expect("avatar");
        let p = b.profiles.get_or_create(&openid).await.expect("read");
        assert_eq!(
            (p.nickname.as_deref(), p.avatar_url.as_deref()),
            (Some("Zoë"), Some(url)),
            "round {round}"
        );
    }
}

// ---- replicas on PostgreSQL with profile stamps in Redis ----

/// Two replicas' profile stores on one fresh PostgreSQL database, each keeping profiles
/// under stamps in the Redis at `redis`; or `None` when skipping was asked for.
async fn two_replicas(test: &str, redis: &str) -> Option<[KeptProfiles<PgProfiles>; 2]> {
    let url = crate::support::postgres_database(test).await?;
    let replica = || async {
        let db = crate::support::open_postgres(&url).await;
        let Db::Postgres(pg) = db else {
            panic!("a postgres:// URL must open PostgreSQL");
        };
        crate::support::migrated(&pg).await;
        let stamps = Stamps::new(&SecretString::from(redis.to_owned())).expect("a Redis URL");
        KeptProfiles::with_stamps(PgProfiles::new(pg), 100, stamps)
    };
    Some([replica().await, replica().await])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_is_what_the_other_answers_next() {
    const TEST: &str = "profiles::a_change_through_one_replica_is_what_the_other_answers_next";
    let Some(redis) = crate::support::redis_url(TEST) else {
        return;
    };
    let Some([a, b]) = two_replicas(TEST, &redis).await else {
        return;
    };
    let openid = format!("o-{}", uuid::Uuid::new_v4().simple());

    // A reads the profile twice: it keeps it.
    for _ in 0..2 {
        let p = a.get_or_create(&openid).await.expect("read");
        assert_eq!(p.nickname, None);
    }
    assert_eq!(a.len(), 1, "A keeps what it read");

    // Changes through B are what A answers next, each time.
    for name in ["first", "second"] {
        b.update(&openid, nickname(name)).await.expect("update");
        for _ in 0..2 {
            let p = a.get_or_create(&openid).await.expect("read");
            assert_eq!(
                p.nickname.as_deref(),
                Some(name),
                "A answered a stale profile"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_profile_stamp_is_made_while_any_change_runs() {
    const TEST: &str = "profiles::no_profile_stamp_is_made_while_any_change_runs";
    let Some(redis) = crate::support::redis_url(TEST) else {
        return;
    };
    let (a, b) = (
        Stamps::new(&SecretString::from(redis.clone())).expect("a Redis URL"),
        Stamps::new(&SecretString::from(redis)).expect("a Redis URL"),
    );
    let openid = format!("o-{}", uuid::Uuid::new_v4().simple());
    // Two changes of one profile overlap, on two replicas.
    a.write_started(&openid).await.expect("A starts");
    b.write_started(&openid).await.expect("B starts");

    // Act: A's change ends first; B's has not (and may never say so: its end may fail).
    a.write_ended(&openid).await;

    // Assert: no stamp is made, and none is usable, until B's change ends too.
    assert_eq!(a.get(&openid).await, Stamp::Unusable);
    assert_eq!(a.make(&openid).await, None);
    b.write_ended(&openid).await;
    assert_eq!(a.get(&openid).await, Stamp::Missing);
    let made = a.make(&openid).await;
    assert!(made.is_some());
    assert_eq!(
        b.get(&openid).await,
        Stamp::Current(made.unwrap_or_default())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_profiles_are_read_from_the_database_and_changes_refused() {
    const TEST: &str =
        "profiles::without_redis_profiles_are_read_from_the_database_and_changes_refused";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let dead = format!("redis://{}", listener.local_addr().expect("address"));
    drop(listener);
    let Some([a, _]) = two_replicas(TEST, &dead).await else {
        return;
    };

    let p = a.get_or_create("o").await.expect("read from the database");
    assert_eq!(p.openid, "o");
    a.get_or_create("o").await.expect("read again");
    assert!(a.is_empty(), "nothing is kept without stamps");
    let err = a
        .update("o", nickname("x"))
        .await
        .expect_err("refused: other replicas could not be told");
    assert_eq!(err.code(), "unavailable");
}
