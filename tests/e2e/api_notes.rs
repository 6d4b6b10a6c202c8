//! `/v1/notes` through the real binaries: the CRUD round trip, every validation rule with its
//! field, one 404 for every id that is not the caller's, cursor pagination under concurrent
//! writes, `Idempotency-Key` (replay, reuse, per user, across a restart) and data isolation
//! under hundreds of concurrent requests.

use std::collections::{HashMap, HashSet};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::api_common::{Answer, ApiWorld, Caller, api_world};

const NOTES: &str = "/v1/notes";

fn note_path(id: &str) -> String {
    format!("{NOTES}/{id}")
}

/// The path of a note answer.
fn target_path(note: &Value) -> String {
    note_path(str_of(note, "id"))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// Creates a note; panics unless the answer is 201 with a note.
async fn create(caller: &Caller, token: &str, title: &str, body: &str) -> Value {
    let a = caller
        .send(
            Method::POST,
            NOTES,
            Some(token),
            Some(json!({ "title": title, "body": body })),
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    a.json()
}

/// One page; panics unless the answer is 200.
async fn page(caller: &Caller, token: &str, query: &str) -> Value {
    let a = caller
        .send(
            Method::GET,
            &format!("{NOTES}{query}"),
            Some(token),
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    a.json()
}

fn items(page: &Value) -> &Vec<Value> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"))
}

fn titles(page: &Value) -> Vec<String> {
    items(page)
        .iter()
        .map(|n| str_of(n, "title").to_owned())
        .collect()
}

fn next_cursor(page: &Value) -> Option<String> {
    match &page["next_cursor"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("next_cursor is neither null nor a string: {other}"),
    }
}

/// Every note of the user, following cursors, newest first.
async fn all_titles(caller: &Caller, token: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut query = "?limit=100".to_owned();
    loop {
        let p = page(caller, token, &query).await;
        out.extend(titles(&p));
        match next_cursor(&p) {
            Some(c) => query = format!("?limit=100&cursor={c}"),
            None => return out,
        }
    }
}

fn is_rfc3339_utc_millis(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[23] == b'Z'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
}

/// A new note's id: a UUID version 7 (time-ordered), lower-case and hyphenated.
fn is_uuid_v7(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                *c == b'-'
            } else {
                c.is_ascii_digit() || (b'a'..=b'f').contains(c)
            }
        })
        && b[14] == b'7'
        && b"89ab".contains(&b[19])
}

/// Checks the shape of a note answer.
fn assert_note(note: &Value, title: &str, body: &str) {
    assert_eq!(
        note.as_object().map(serde_json::Map::len),
        Some(5),
        "{note}"
    );
    assert!(is_uuid_v7(str_of(note, "id")), "{note}");
    assert_eq!(note["title"], title, "{note}");
    assert_eq!(note["body"], body, "{note}");
    assert!(is_rfc3339_utc_millis(str_of(note, "created_at")), "{note}");
    assert!(is_rfc3339_utc_millis(str_of(note, "updated_at")), "{note}");
}

#[tokio::test]
async fn a_note_is_created_read_listed_changed_and_deleted() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    assert_eq!(alice.pair["is_new_user"], true);
    let t = Some(alice.access_token.as_str());

    // Act: create
    let created = w
        .send(
            Method::POST,
            NOTES,
            t,
            Some(json!({"title": "购物清单 🛒", "body": "milk\neggs\n\ttea"})),
            &[],
        )
        .await;

    // Assert
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let note = created.json();
    assert_note(&note, "购物清单 🛒", "milk\neggs\n\ttea");
    assert_eq!(note["created_at"], note["updated_at"]);
    let id = str_of(&note, "id").to_owned();
    assert_eq!(
        created.header("location").map(str::to_owned),
        Some(note_path(&id))
    );

    // Act and assert: read, list
    let got = w.send(Method::GET, &note_path(&id), t, None, &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json(), note);
    let listed = page(&w.caller(), &alice.access_token, "").await;
    assert_eq!(
        listed,
        json!({"items": [note.clone()], "next_cursor": null})
    );

    // Act and assert: change the title only, then the body only, then nothing
    let patched = w
        .send(
            Method::PATCH,
            &note_path(&id),
            t,
            Some(json!({"title": "Groceries"})),
            &[],
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let patched = patched.json();
    assert_note(&patched, "Groceries", "milk\neggs\n\ttea");
    assert_eq!(patched["id"], note["id"]);
    assert_eq!(patched["created_at"], note["created_at"]);
    assert!(str_of(&patched, "updated_at") >= str_of(&note, "updated_at"));

    let emptied = w
        .send(
            Method::PATCH,
            &note_path(&id),
            t,
            Some(json!({"body": ""})),
            &[],
        )
        .await;
    assert_eq!(emptied.status, StatusCode::OK, "{}", emptied.text());
    let emptied = emptied.json();
    assert_note(&emptied, "Groceries", "");

    let unchanged = w
        .send(Method::PATCH, &note_path(&id), t, Some(json!({})), &[])
        .await;
    assert_eq!(unchanged.status, StatusCode::OK);
    assert_eq!(unchanged.json(), emptied);
    let got = w.send(Method::GET, &note_path(&id), t, None, &[]).await;
    assert_eq!(got.json(), emptied);

    // Act and assert: delete; then it is gone
    let deleted = w.send(Method::DELETE, &note_path(&id), t, None, &[]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(deleted.bytes.is_empty(), "{}", deleted.text());
    assert_eq!(deleted.header("content-type"), None);
    assert!(deleted.header("x-request-id").is_some());

    let gone = w.send(Method::GET, &note_path(&id), t, None, &[]).await;
    gone.error(StatusCode::NOT_FOUND, "not_found");
    let again = w.send(Method::DELETE, &note_path(&id), t, None, &[]).await;
    again.error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        page(&w.caller(), &alice.access_token, "").await,
        json!({"items": [], "next_cursor": null})
    );
}

/// A request the edge must refuse with 400, naming `field`.
struct Refused {
    method: Method,
    path: String,
    body: Option<Value>,
    idempotency_key: Option<String>,
    field: &'static str,
    code: &'static str,
}

impl Refused {
    fn new(method: Method, path: &str, body: Option<Value>, field: &'static str) -> Self {
        Self {
            method,
            path: path.to_owned(),
            body,
            idempotency_key: None,
            field,
            code: "invalid_argument",
        }
    }

    /// Refused by the JSON reader (wrong type, unknown field) rather than by a rule.
    fn by_json(mut self) -> Self {
        self.code = "invalid_request";
        self
    }

    fn with_key(mut self, key: &str) -> Self {
        self.idempotency_key = Some(key.to_owned());
        self
    }
}

#[tokio::test]
async fn every_validation_rule_answers_400_naming_its_field() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    let t = Some(alice.access_token.as_str());
    let target = create(&w.caller(), &alice.access_token, "keep me", "as I am").await;
    let one = target_path(&target);
    let long_body = "b".repeat(10_001);
    let mut cases = Vec::new();
    for title in ["", "   ", &"题".repeat(101), "bell\u{7}", "two\nlines"] {
        let body = json!({"title": title, "body": "x"});
        cases.push(Refused::new(Method::POST, NOTES, Some(body), "title"));
        let body = json!({ "title": title });
        cases.push(Refused::new(Method::PATCH, &one, Some(body), "title"));
    }
    let post = |body: Value, field| Refused::new(Method::POST, NOTES, Some(body), field);
    let patch = |body: Value, field| Refused::new(Method::PATCH, &one, Some(body), field);
    let list =
        |query: &str, field| Refused::new(Method::GET, &format!("{NOTES}?{query}"), None, field);
    cases.extend([
        post(json!({"body": "no title"}), "title"),
        post(json!({"title": null}), "title").by_json(),
        patch(json!({"title": null}), "title").by_json(),
        post(json!({"title": "t", "body": long_body}), "body"),
        patch(json!({ "body": long_body }), "body"),
        post(json!({"title": "t", "body": "", "colour": "red"}), "colour").by_json(),
        patch(json!({"colour": "red"}), "colour").by_json(),
        post(json!({"title": "t"}), "Idempotency-Key").with_key(&"k".repeat(256)),
        post(json!({"title": "t"}), "Idempotency-Key").with_key("tab\there"),
        list("limit=0", "limit"),
        list("limit=101", "limit"),
        list("limit=x", "limit"),
        list("limit=1&limit=2", "limit").by_json(),
        list("cursor=a&cursor=b", "cursor").by_json(),
        list("cursor=not-a-cursor!", "cursor"),
        list("cursor=AAAAAAAAAAAA", "cursor"),
    ]);

    for case in cases {
        // Act
        let headers: Vec<(&str, &str)> = case
            .idempotency_key
            .iter()
            .map(|k| ("Idempotency-Key", k.as_str()))
            .collect();
        let a = w
            .send(
                case.method.clone(),
                &case.path,
                t,
                case.body.clone(),
                &headers,
            )
            .await;

        // Assert
        let error = a.error(StatusCode::BAD_REQUEST, case.code);
        assert_eq!(
            error["field"], case.field,
            "{} {} {:?}: {error}",
            case.method, case.path, case.body
        );
    }

    // Nothing was made or changed by the refused requests; the limits themselves are fine.
    let c = w.caller();
    assert_eq!(all_titles(&c, &alice.access_token).await, ["keep me"]);
    let (title, body) = ("题".repeat(100), "文".repeat(10_000));
    let at_limits = create(&c, &alice.access_token, &title, &body).await;
    assert_note(&at_limits, &title, &body);
    let first = page(&c, &alice.access_token, "?limit=1").await;
    assert_eq!(items(&first).len(), 1);
    assert!(next_cursor(&first).is_some());
    let all = page(&c, &alice.access_token, "?limit=100").await;
    assert_eq!(items(&all).len(), 2);
    let got = w.send(Method::GET, &one, t, None, &[]).await;
    assert_eq!(got.json(), target);
}

#[tokio::test]
async fn another_users_note_an_unknown_id_and_a_malformed_id_answer_the_same_404() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    let bob = w.login().await;
    let note = create(
        &w.caller(),
        &alice.access_token,
        "alice's secret",
        "do not read",
    )
    .await;
    let alices = str_of(&note, "id").to_owned();
    let never_issued = "0b8f6a2e-5c3d-4e1f-9a7b-3c2d1e0f9a8b".to_owned();
    let ids = [
        alices.clone(),
        never_issued.clone(),
        "42".to_owned(),
        "not-a-uuid".to_owned(),
        alices.to_uppercase(),
        alices.replace('-', ""),
        format!("{alices}x"),
        "%FF%FE".to_owned(),
    ];
    let bob_t = Some(bob.access_token.as_str());
    let reference = w
        .send(Method::GET, &note_path(&never_issued), bob_t, None, &[])
        .await;
    reference.error(StatusCode::NOT_FOUND, "not_found");
    let reference = reference.bytes_without_request_id();

    for method in [Method::GET, Method::PATCH, Method::DELETE] {
        for id in &ids {
            let body = (method == Method::PATCH).then(|| json!({"title": "bob was here"}));

            // Act
            let a = w
                .send(method.clone(), &note_path(id), bob_t, body, &[])
                .await;

            // Assert
            a.error(StatusCode::NOT_FOUND, "not_found");
            assert_eq!(
                a.bytes_without_request_id(),
                reference,
                "{method} {id}: {}",
                a.text()
            );
        }
    }

    // Alice's own malformed ids answer the same, and her note is untouched.
    let alice_t = Some(alice.access_token.as_str());
    let a = w
        .send(Method::GET, &note_path("42"), alice_t, None, &[])
        .await;
    assert_eq!(a.bytes_without_request_id(), reference);
    let mine = w
        .send(Method::GET, &note_path(&alices), alice_t, None, &[])
        .await;
    assert_eq!(mine.status, StatusCode::OK);
    assert_eq!(mine.json(), note);
    assert_eq!(
        all_titles(&w.caller(), &bob.access_token).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn forty_five_notes_come_in_pages_of_20_20_and_5_newest_first() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    let bob = w.login().await;
    let c = w.caller();
    // Bob's note is older than all of Alice's: her cursors point past it.
    create(&c, &bob.access_token, "bob's only note", "").await;
    for i in 0..45 {
        create(&c, &alice.access_token, &format!("note {i:02}"), "").await;
    }

    // Act
    let first = page(&c, &alice.access_token, "?limit=20").await;
    let cursor1 = next_cursor(&first).expect("a second page");
    let second = page(
        &c,
        &alice.access_token,
        &format!("?limit=20&cursor={cursor1}"),
    )
    .await;
    let cursor2 = next_cursor(&second).expect("a third page");
    let third = page(
        &c,
        &alice.access_token,
        &format!("?cursor={cursor2}&limit=20"),
    )
    .await;

    // Assert
    let expected: Vec<String> = (0..45).rev().map(|i| format!("note {i:02}")).collect();
    assert_eq!(titles(&first), expected[..20]);
    assert_eq!(titles(&second), expected[20..40]);
    assert_eq!(titles(&third), expected[40..]);
    assert_eq!(third["next_cursor"], Value::Null);
    // The default page size is 20.
    let default = page(&c, &alice.access_token, "").await;
    assert_eq!(default, first);
    // A cursor only says where to start among the caller's own notes.
    let bobs = page(&c, &bob.access_token, &format!("?cursor={cursor1}")).await;
    assert_eq!(titles(&bobs), ["bob's only note"]);
}

#[tokio::test]
async fn notes_created_and_deleted_between_pages_neither_repeat_nor_skip_the_others() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    let c = w.caller();
    let token = alice.access_token.as_str();
    let mut ids = HashMap::new();
    for i in 0..30 {
        let n = create(&c, token, &format!("old {i:02}"), "").await;
        ids.insert(format!("old {i:02}"), str_of(&n, "id").to_owned());
    }
    let delete = |title: &str| {
        let path = note_path(&ids[title]);
        let c = c.clone();
        async move {
            let a = c.send(Method::DELETE, &path, Some(token), None, &[]).await;
            assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.text());
        }
    };

    // Act: page by page, with writes in between
    let mut seen = Vec::new();
    let first = page(&c, token, "?limit=10").await;
    seen.extend(titles(&first));
    for i in 0..5 {
        create(&c, token, &format!("new {i}"), "").await;
    }
    delete("old 25").await; // already seen
    delete("old 15").await; // not yet seen
    let mut cursor = next_cursor(&first);
    let mut newer = 0;
    while let Some(cur) = cursor {
        let p = page(&c, token, &format!("?limit=10&cursor={cur}")).await;
        seen.extend(titles(&p));
        create(&c, token, "newer still", "").await;
        newer += 1;
        cursor = next_cursor(&p);
    }

    // Assert: every note that was there when the listing began and still is, once, in order
    let expected: Vec<String> = (0..30)
        .rev()
        .filter(|i| *i != 15)
        .map(|i| format!("old {i:02}"))
        .collect();
    assert_eq!(seen, expected);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());
    // A fresh listing has them all, newest first.
    let now = all_titles(&c, token).await;
    assert_eq!(newer, 2, "pages of 10, 10 and 9");
    assert_eq!(now.len(), newer + 5 + 28);
    assert_eq!(now[..2], ["newer still", "newer still"]);
    assert_eq!(now[2..7], ["new 4", "new 3", "new 2", "new 1", "new 0"]);
    let still_there: Vec<&String> = expected.iter().filter(|t| *t != "old 25").collect();
    assert_eq!(now[7..].iter().collect::<Vec<_>>(), still_there);
}

/// A creation with an `Idempotency-Key`.
async fn create_keyed(caller: &Caller, token: &str, key: &str, title: &str) -> Answer {
    caller
        .send(
            Method::POST,
            NOTES,
            Some(token),
            Some(json!({"title": title, "body": "once"})),
            &[("Idempotency-Key", key)],
        )
        .await
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_refuses_another_body() {
    // Arrange
    let w = api_world(&[], &[]).await;
    let alice = w.login().await;
    let bob = w.login().await;
    let c = w.caller();
    let key = "order-7f3a:2026-11-24T23:59:01Z";
    let first = create_keyed(&c, &alice.access_token, key, "pay once").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let note = first.json();

    // Act: retries, sequential and concurrent
    let retry = create_keyed(&c, &alice.access_token, key, "pay once").await;
    let mut tasks = JoinSet::new();
    for _ in 0..10 {
        let (c, token) = (c.clone(), alice.access_token.clone());
        tasks.spawn(async move { create_keyed(&c, &token, key, "pay once").await });
    }
    let concurrent = tasks.join_all().await;

    // Assert: the same status, body and note; only one note exists
    for a in std::iter::once(&retry).chain(&concurrent) {
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
        assert_eq!(a.bytes, first.bytes);
        assert_eq!(a.json(), note);
        assert_eq!(a.header("idempotent-replayed"), Some("true"));
        assert_eq!(a.header("location"), first.header("location"));
    }
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(all_titles(&c, &alice.access_token).await, ["pay once"]);

    // Act and assert: the same key with another body
    let other = create_keyed(&c, &alice.access_token, key, "pay twice").await;
    other.error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(all_titles(&c, &alice.access_token).await, ["pay once"]);

    // Act and assert: the same key from another user makes that user's own note
    let bobs = create_keyed(&c, &bob.access_token, key, "pay once").await;
    assert_eq!(bobs.status, StatusCode::CREATED, "{}", bobs.text());
    assert_eq!(bobs.header("idempotent-replayed"), None);
    let bobs = bobs.json();
    assert_ne!(bobs["id"], note["id"]);
    assert_eq!(all_titles(&c, &bob.access_token).await, ["pay once"]);
    assert_eq!(all_titles(&c, &alice.access_token).await, ["pay once"]);
    let bob_reads_alices = c
        .send(
            Method::GET,
            &note_path(str_of(&note, "id")),
            Some(&bob.access_token),
            None,
            &[],
        )
        .await;
    bob_reads_alices.error(StatusCode::NOT_FOUND, "not_found");

    // A deleted note's key still answers its first answer: a retry never makes it again.
    let deleted = c
        .send(
            Method::DELETE,
            &note_path(str_of(&note, "id")),
            Some(&alice.access_token),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let late_retry = create_keyed(&c, &alice.access_token, key, "pay once").await;
    assert_eq!(late_retry.status, StatusCode::CREATED);
    assert_eq!(late_retry.bytes, first.bytes);
    assert!(all_titles(&c, &alice.access_token).await.is_empty());
}

#[tokio::test]
async fn an_idempotency_key_survives_a_restart() {
    // Arrange
    let mut w: ApiWorld = api_world(&[], &[]).await;
    let alice = w.login().await;
    let first = create_keyed(&w.caller(), &alice.access_token, "k-1", "before restart").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());

    // Act
    w.api.restart().await.expect("api-service restarts");
    let c = w.caller();
    let retry = create_keyed(&c, &alice.access_token, "k-1", "before restart").await;
    let other = create_keyed(&c, &alice.access_token, "k-1", "after restart").await;

    // Assert
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.text());
    assert_eq!(retry.bytes, first.bytes);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    other.error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(
        all_titles(&c, &alice.access_token).await,
        ["before restart"]
    );
}

/// What one of the concurrent requests was shown.
enum Seen {
    /// The note it made: id and title.
    Created(String, String),
    /// The titles of a page.
    Listed(Vec<String>),
    /// The title of the note it read.
    Got(String),
}

#[tokio::test]
async fn under_600_concurrent_requests_no_answer_carries_another_users_data() {
    // Arrange: 30 users with 3 notes each, every title and body carrying its owner's marker
    let w = api_world(&[], &[("API_AUTH_TIMEOUT", "30s")]).await;
    let c = w.caller();
    let mut users = Vec::new();
    for _ in 0..30 {
        let user = w.login().await;
        let marker = format!("owner={} ", user.openid);
        let mut own = Vec::new();
        for i in 0..3 {
            let n = create(
                &c,
                &user.access_token,
                &format!("{marker}seed {i}"),
                &marker,
            )
            .await;
            own.push(str_of(&n, "id").to_owned());
        }
        users.push((user, marker, own));
    }

    // Act: 600 requests at once, 20 rounds over the 30 users, each round all creates, all
    // lists or all reads, so that every user's requests interleave with everyone else's
    let mut tasks = JoinSet::new();
    for i in 0..600_usize {
        let (round, (user, marker, own)) = (i / users.len(), &users[i % users.len()]);
        let (c, token, marker) = (c.clone(), user.access_token.clone(), marker.clone());
        let id = own[round % own.len()].clone();
        tasks.spawn(async move {
            let seen = match round % 3 {
                0 => {
                    let title = format!("{marker}call {i}");
                    let body = json!({"title": title, "body": marker});
                    let a = c
                        .send(Method::POST, NOTES, Some(&token), Some(body), &[])
                        .await;
                    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
                    let n = a.json();
                    assert_eq!(n["body"], marker.as_str(), "{n}");
                    Seen::Created(str_of(&n, "id").to_owned(), str_of(&n, "title").to_owned())
                }
                1 => {
                    let path = format!("{NOTES}?limit=100");
                    let a = c.send(Method::GET, &path, Some(&token), None, &[]).await;
                    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
                    let p = a.json();
                    for n in items(&p) {
                        assert_eq!(n["body"], marker.as_str(), "{n}");
                    }
                    Seen::Listed(titles(&p))
                }
                _ => {
                    let a = c
                        .send(Method::GET, &note_path(&id), Some(&token), None, &[])
                        .await;
                    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
                    let n = a.json();
                    assert_eq!(n["id"], id.as_str(), "{n}");
                    assert_eq!(n["body"], marker.as_str(), "{n}");
                    Seen::Got(str_of(&n, "title").to_owned())
                }
            };
            (marker, seen)
        });
    }
    let answers = tasks.join_all().await;

    // Assert: every title each user was shown is theirs
    assert_eq!(answers.len(), 600);
    let mut created: HashMap<String, HashSet<String>> = HashMap::new();
    for (marker, seen) in &answers {
        match seen {
            Seen::Created(id, title) => {
                assert!(
                    title.starts_with(marker.as_str()),
                    "{marker} was given {title}"
                );
                assert!(
                    created
                        .entry(marker.clone())
                        .or_default()
                        .insert(id.clone())
                );
            }
            Seen::Listed(titles) => {
                assert!(titles.len() >= 3, "{marker} lost notes: {titles:?}");
                for t in titles {
                    assert!(t.starts_with(marker.as_str()), "{marker} was shown {t}");
                }
            }
            Seen::Got(title) => {
                assert!(
                    title.starts_with(marker.as_str()),
                    "{marker} was shown {title}"
                );
            }
        }
    }
    // Afterwards each user has exactly their seeds and their own creations (7 rounds of 20
    // were creations).
    for (user, marker, _) in &users {
        let mine = all_titles(&c, &user.access_token).await;
        assert_eq!(created.get(marker).map(HashSet::len), Some(7), "{marker}");
        assert_eq!(mine.len(), 3 + 7, "{marker}: {mine:?}");
        assert!(
            mine.iter().all(|t| t.starts_with(marker.as_str())),
            "{marker}: {mine:?}"
        );
    }
}
