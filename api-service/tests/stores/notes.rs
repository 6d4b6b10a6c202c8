//! `NotesStore`: scoped to the owner, keyset pages newest first, `Idempotency-Key` kept with
//! the note it answers for, and all of it under concurrency.

use std::collections::HashSet;

use api_service::notes::{
    Created, IDEMPOTENCY_TTL_MILLIS, Note, NoteBody, NoteId, NotePatch, NoteTitle, StoredAnswer,
};
use tokio::task::JoinSet;

use crate::support::{Backend, idempotent, new_note, pages, size, titles};

on_every_backend!(
    notes_are_scoped_to_their_owner,
    a_change_keeps_what_it_does_not_name_and_never_goes_back_in_time,
    pages_run_newest_first_with_limits_and_cursors,
    creations_and_deletions_between_pages_neither_repeat_nor_skip,
    a_key_replays_its_first_answer_even_after_the_note_is_gone,
    a_key_used_with_another_request_is_refused,
    keys_belong_to_their_user,
    a_key_is_forgotten_after_48_hours,
    expired_keys_are_purged,
    concurrent_retries_of_one_key_make_one_note_and_one_answer,
    concurrent_creations_of_several_users_never_mix,
    a_listing_stays_whole_while_the_same_user_creates_notes,
);

/// What the handler answers for a creation: its own answer when it made the note, the
/// first answer when it replayed one.
fn answer_of(created: Created, own: StoredAnswer) -> StoredAnswer {
    match created {
        Created::New => own,
        Created::Replayed(first) => first,
    }
}

fn retitle(title: &str) -> NotePatch {
    NotePatch {
        title: Some(NoteTitle::parse(title).expect("title")),
        body: None,
    }
}

async fn notes_are_scoped_to_their_owner(b: Backend) {
    // Arrange
    let n = new_note("mine", 1_000);
    b.notes.create("alice", &n, None).await.expect("create");

    // Act + Assert: to bob, alice's note does not exist.
    assert_eq!(b.notes.get("alice", &n.id).await.expect("get"), n);
    for e in [
        b.notes.get("bob", &n.id).await.expect_err("get"),
        b.notes
            .update("bob", &n.id, retitle("stolen"), 2_000)
            .await
            .expect_err("update"),
        b.notes
            .update("bob", &n.id, NotePatch::default(), 2_000)
            .await
            .expect_err("empty update"),
        b.notes.delete("bob", &n.id).await.expect_err("delete"),
    ] {
        assert_eq!((e.status().as_u16(), e.code()), (404, "not_found"));
    }
    let bobs = b.notes.list("bob", size(100), None).await.expect("list");
    assert!(bobs.items.is_empty() && bobs.next.is_none());
    assert_eq!(b.notes.get("alice", &n.id).await.expect("untouched"), n);

    // Alice's own changes work, and a deleted note is as unknown as one never made.
    let changed = b
        .notes
        .update("alice", &n.id, retitle("renamed"), 2_000)
        .await
        .expect("patch");
    assert_eq!(changed.title.as_str(), "renamed");
    b.notes.delete("alice", &n.id).await.expect("delete");
    for e in [
        b.notes.get("alice", &n.id).await.expect_err("gone"),
        b.notes.delete("alice", &n.id).await.expect_err("twice"),
        b.notes
            .get("alice", &NoteId::fresh())
            .await
            .expect_err("never made"),
    ] {
        assert_eq!(e.code(), "not_found");
    }
}

async fn a_change_keeps_what_it_does_not_name_and_never_goes_back_in_time(b: Backend) {
    let n = Note::new(
        NoteTitle::parse("title").expect("title"),
        NoteBody::parse("line 1\n\tline 2 购物").expect("body"),
        10_000,
    );
    b.notes.create("alice", &n, None).await.expect("create");

    let titled = b
        .notes
        .update("alice", &n.id, retitle("new title"), 11_000)
        .await
        .expect("title");
    assert_eq!(
        (titled.title.as_str(), titled.body.as_str()),
        ("new title", n.body.as_str())
    );
    assert_eq!((titled.created_at, titled.updated_at), (10_000, 11_000));

    let bodied = b
        .notes
        .update(
            "alice",
            &n.id,
            NotePatch {
                title: None,
                body: Some(NoteBody::parse("").expect("empty body")),
            },
            12_000,
        )
        .await
        .expect("body");
    assert_eq!(
        (bodied.title.as_str(), bodied.body.as_str()),
        ("new title", "")
    );

    // Nothing to change: the note as it is.
    let same = b
        .notes
        .update("alice", &n.id, NotePatch::default(), 13_000)
        .await
        .expect("empty patch");
    assert_eq!(same, bodied);

    // A clock behind the note's birth does not make it changed before it was made.
    let skewed = b
        .notes
        .update("alice", &n.id, retitle("skewed"), 5_000)
        .await
        .expect("skewed clock");
    assert_eq!((skewed.created_at, skewed.updated_at), (10_000, 10_000));
    assert_eq!(b.notes.get("alice", &n.id).await.expect("read"), skewed);
}

async fn pages_run_newest_first_with_limits_and_cursors(b: Backend) {
    // Arrange: five notes made in the same millisecond (order is creation order, not time).
    for i in 0..5 {
        b.notes
            .create("alice", &new_note(&format!("n{i}"), 1_000), None)
            .await
            .expect("create");
    }
    for i in 0..4 {
        b.notes
            .create("bob", &new_note(&format!("b{i}"), 1_000), None)
            .await
            .expect("create");
    }

    // Two at a time: three pages, the last one short and without a cursor.
    let by_two = pages(b.notes.as_ref(), "alice", 2).await;
    let shape: Vec<_> = by_two
        .iter()
        .map(|p| (p.items.len(), p.next.is_some()))
        .collect();
    assert_eq!(shape, [(2, true), (2, true), (1, false)]);
    assert_eq!(
        titles(b.notes.as_ref(), "alice", 2).await,
        ["n4", "n3", "n2", "n1", "n0"]
    );
    assert_eq!(
        titles(b.notes.as_ref(), "alice", 1).await,
        ["n4", "n3", "n2", "n1", "n0"]
    );

    // A page exactly as large as what is left has no cursor: no empty last page.
    let whole = b.notes.list("alice", size(5), None).await.expect("list");
    assert_eq!((whole.items.len(), whole.next), (5, None));
    let bob_pages = pages(b.notes.as_ref(), "bob", 2).await;
    assert_eq!(bob_pages.len(), 2);
    assert_eq!(
        titles(b.notes.as_ref(), "bob", 100).await,
        ["b3", "b2", "b1", "b0"]
    );

    // A cursor only says where to start: used by another user, it reads that user's notes.
    let alices_cursor = by_two[0].next;
    let bob_from_there = b
        .notes
        .list("bob", size(100), alices_cursor)
        .await
        .expect("list");
    assert!(
        bob_from_there
            .items
            .iter()
            .all(|n| n.title.as_str().starts_with('b'))
    );
}

async fn creations_and_deletions_between_pages_neither_repeat_nor_skip(b: Backend) {
    // Arrange: n0..n9.
    let mut made = Vec::new();
    for i in 0..10 {
        let n = new_note(&format!("n{i}"), 1_000 + i);
        b.notes.create("alice", &n, None).await.expect("create");
        made.push(n);
    }
    let first = b.notes.list("alice", size(3), None).await.expect("page 1");
    let mut seen: Vec<String> = first
        .items
        .iter()
        .map(|n| n.title.as_str().to_owned())
        .collect();
    assert_eq!(seen, ["n9", "n8", "n7"]);

    // Act: between pages, two notes are made, one already seen and one not yet seen deleted.
    for i in 10..12 {
        b.notes
            .create("alice", &new_note(&format!("n{i}"), 2_000), None)
            .await
            .expect("create");
    }
    b.notes
        .delete("alice", &made[8].id)
        .await
        .expect("delete n8");
    b.notes
        .delete("alice", &made[5].id)
        .await
        .expect("delete n5");
    let mut cursor = first.next;
    while let Some(c) = cursor {
        let page = b.notes.list("alice", size(3), Some(c)).await.expect("page");
        seen.extend(page.items.iter().map(|n| n.title.as_str().to_owned()));
        cursor = page.next;
    }

    // Assert: every note that was there and still is appears once, in order; the new ones
    // (newer than where the listing is) belong to the next listing.
    assert_eq!(seen, ["n9", "n8", "n7", "n6", "n4", "n3", "n2", "n1", "n0"]);
    assert_eq!(
        titles(b.notes.as_ref(), "alice", 4).await,
        ["n11", "n10", "n9", "n7", "n6", "n4", "n3", "n2", "n1", "n0"]
    );
}

async fn a_key_replays_its_first_answer_even_after_the_note_is_gone(b: Backend) {
    let first = new_note("first", 1_000);
    let created = b
        .notes
        .create("alice", &first, Some(idempotent("k-1", &first)))
        .await
        .expect("create");
    assert_eq!(created, Created::New);

    // The same request again, later, as a new note with a new id: the first answer.
    let retry = Note::new(first.title.clone(), first.body.clone(), 2_000);
    let replayed = b
        .notes
        .create("alice", &retry, Some(idempotent("k-1", &retry)))
        .await
        .expect("retry");
    assert_eq!(
        replayed,
        Created::Replayed(idempotent("k-1", &first).answer)
    );
    assert_eq!(titles(b.notes.as_ref(), "alice", 100).await, ["first"]);
    assert_eq!(
        b.notes
            .get("alice", &retry.id)
            .await
            .expect_err("no second")
            .code(),
        "not_found"
    );

    // Deleting the note does not let a retry make it again.
    b.notes.delete("alice", &first.id).await.expect("delete");
    let after = Note::new(first.title.clone(), first.body.clone(), 3_000);
    let replayed = b
        .notes
        .create("alice", &after, Some(idempotent("k-1", &after)))
        .await
        .expect("retry after delete");
    assert_eq!(
        replayed,
        Created::Replayed(idempotent("k-1", &first).answer)
    );
    assert!(titles(b.notes.as_ref(), "alice", 100).await.is_empty());
}

async fn a_key_used_with_another_request_is_refused(b: Backend) {
    let first = new_note("first", 1_000);
    b.notes
        .create("alice", &first, Some(idempotent("k", &first)))
        .await
        .expect("create");

    for other in [
        new_note("other", 2_000),
        Note::new(
            first.title.clone(),
            NoteBody::parse("another body").expect("body"),
            2_000,
        ),
    ] {
        let e = b
            .notes
            .create("alice", &other, Some(idempotent("k", &other)))
            .await
            .expect_err("reused");
        assert_eq!(
            (e.status().as_u16(), e.code()),
            (422, "idempotency_key_reused")
        );
    }
    assert_eq!(titles(b.notes.as_ref(), "alice", 100).await, ["first"]);
}

async fn keys_belong_to_their_user(b: Backend) {
    let alices = new_note("same", 1_000);
    let bobs = new_note("same", 1_000);
    for (openid, note) in [("alice", &alices), ("bob", &bobs)] {
        assert_eq!(
            b.notes
                .create(openid, note, Some(idempotent("shared-key", note)))
                .await
                .expect("create"),
            Created::New,
            "{openid}"
        );
    }
    let retry = new_note("same", 2_000);
    let Created::Replayed(answer) = b
        .notes
        .create("bob", &retry, Some(idempotent("shared-key", &retry)))
        .await
        .expect("retry")
    else {
        panic!("bob's retry must replay bob's answer");
    };
    assert_eq!(answer.note_id, bobs.id.as_str());
}

async fn a_key_is_forgotten_after_48_hours(b: Backend) {
    let first = new_note("first", 1_000);
    b.notes
        .create("alice", &first, Some(idempotent("k", &first)))
        .await
        .expect("create");

    // At exactly 48 hours it is still remembered...
    let at_limit = Note::new(
        first.title.clone(),
        first.body.clone(),
        1_000 + IDEMPOTENCY_TTL_MILLIS,
    );
    assert!(matches!(
        b.notes
            .create("alice", &at_limit, Some(idempotent("k", &at_limit)))
            .await
            .expect("at the limit"),
        Created::Replayed(_)
    ));

    // ...a millisecond later the same request makes a new note, and the key is its.
    let later = Note::new(
        first.title.clone(),
        first.body.clone(),
        1_000 + IDEMPOTENCY_TTL_MILLIS + 1,
    );
    assert_eq!(
        b.notes
            .create("alice", &later, Some(idempotent("k", &later)))
            .await
            .expect("after expiry"),
        Created::New
    );
    let again = Note::new(
        first.title.clone(),
        first.body.clone(),
        later.created_at + 1,
    );
    assert_eq!(
        b.notes
            .create("alice", &again, Some(idempotent("k", &again)))
            .await
            .expect("retry of the new one"),
        Created::Replayed(idempotent("k", &later).answer)
    );
    assert_eq!(titles(b.notes.as_ref(), "alice", 100).await.len(), 2);
}

async fn expired_keys_are_purged(b: Backend) {
    let old = new_note("old", 1_000);
    b.notes
        .create("alice", &old, Some(idempotent("old", &old)))
        .await
        .expect("old");
    assert_eq!(b.idempotency_rows().await, 1);

    // A day after the key expired, any creation (here another user's) purges it: the first
    // creation of a process purges, then at most one an hour (on PostgreSQL in a task of
    // its own, off the creation's path: waited for, bounded).
    let now = 1_000 + IDEMPOTENCY_TTL_MILLIS + 24 * 60 * 60 * 1000;
    let fresh = new_note("fresh", now);
    b.notes
        .create("bob", &fresh, Some(idempotent("fresh", &fresh)))
        .await
        .expect("fresh");
    let rows = b
        .idempotency_rows_reaching(1, std::time::Duration::from_secs(10))
        .await;
    assert_eq!(rows, 1, "only the fresh key is left");
}

async fn concurrent_retries_of_one_key_make_one_note_and_one_answer(b: Backend) {
    // Arrange: 20 copies of one request, each as its handler would build it.
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let notes = b.notes.clone();
        tasks.spawn(async move {
            let note = new_note("once", 1_000);
            let idem = idempotent("retry-storm", &note);
            let own = idem.answer.clone();
            let created = notes.create("alice", &note, Some(idem)).await;
            created.map(|c| (matches!(c, Created::New), answer_of(c, own)))
        });
    }

    // Act
    let results: Vec<(bool, StoredAnswer)> = tasks
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("every retry is answered"))
        .collect();

    // Assert: one made the note; all 20 got its answer; there is one note.
    assert_eq!(results.iter().filter(|(new, _)| *new).count(), 1);
    let answer = &results[0].1;
    assert!(results.iter().all(|(_, a)| a == answer), "{results:?}");
    let listed = b.notes.list("alice", size(100), None).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].id.as_str(), answer.note_id);
}

async fn concurrent_creations_of_several_users_never_mix(b: Backend) {
    const USERS: usize = 5;
    const EACH: usize = 8;
    let mut tasks = JoinSet::new();
    for u in 0..USERS {
        for i in 0..EACH {
            let notes = b.notes.clone();
            tasks.spawn(async move {
                let openid = format!("user-{u}");
                let note = new_note(&format!("{openid}/{i}"), 1_000);
                // Half carry keys, with the same names for every user.
                let idem = (i % 2 == 0).then(|| idempotent(&format!("k{i}"), &note));
                let created = notes.create(&openid, &note, idem).await.expect("create");
                assert_eq!(created, Created::New);
                (openid, note)
            });
        }
    }
    let made = tasks.join_all().await;

    for u in 0..USERS {
        let openid = format!("user-{u}");
        let listed = titles(b.notes.as_ref(), &openid, 3).await;
        let mine: HashSet<String> = made
            .iter()
            .filter(|(o, _)| *o == openid)
            .map(|(_, n)| n.title.as_str().to_owned())
            .collect();
        assert_eq!(listed.len(), EACH, "{openid}: {listed:?}");
        assert_eq!(listed.iter().cloned().collect::<HashSet<_>>(), mine);
    }
    for (owner, note) in &made {
        assert_eq!(b.notes.get(owner, &note.id).await.expect("own"), *note);
        let other = if owner == "user-0" {
            "user-1"
        } else {
            "user-0"
        };
        assert_eq!(
            b.notes
                .get(other, &note.id)
                .await
                .expect_err("other")
                .code(),
            "not_found"
        );
    }
}

async fn a_listing_stays_whole_while_the_same_user_creates_notes(b: Backend) {
    // Arrange: 30 notes that exist before the listing starts.
    let mut before = HashSet::new();
    for i in 0..30 {
        let n = new_note(&format!("old-{i}"), 1_000);
        b.notes.create("alice", &n, None).await.expect("create");
        before.insert(n.id.as_str().to_owned());
    }

    // Act: page through three at a time while 20 more are being made.
    let mut writers = JoinSet::new();
    for i in 0..20 {
        let notes = b.notes.clone();
        writers.spawn(async move {
            notes
                .create("alice", &new_note(&format!("new-{i}"), 2_000), None)
                .await
                .expect("create");
        });
    }
    let mut listed = Vec::new();
    let mut cursor = None;
    loop {
        let page = b.notes.list("alice", size(3), cursor).await.expect("page");
        listed.extend(page.items.iter().map(|n| n.id.as_str().to_owned()));
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    writers.join_all().await;

    // Assert: no note twice, and every note that was there before is there.
    let distinct: HashSet<&String> = listed.iter().collect();
    assert_eq!(distinct.len(), listed.len(), "a note was listed twice");
    assert!(
        before.iter().all(|id| distinct.contains(id)),
        "a note that existed before the listing was skipped"
    );
    assert_eq!(titles(b.notes.as_ref(), "alice", 100).await.len(), 50);
}
