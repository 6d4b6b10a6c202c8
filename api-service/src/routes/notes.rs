//! `/v1/notes`: the sample business resource over HTTP (the domain is `crate::notes`). Wire
//! types become domain types here, at the edge; every call is scoped to the caller's openid,
//! and any id that is not one of the caller's notes (another user's, deleted, never issued,
//! malformed) answers the same 404 `not_found`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Authenticated;
use crate::error::{ApiError, ErrorEnvelope, JSON_UTF8};
use crate::json::Json;
use crate::notes::{
    Created, Cursor, IDEMPOTENCY_KEY_HEADER, IdempotencyKey, Idempotent, Note, NoteBody, NoteId,
    NotePatch, NoteTitle, PageSize, RequestFingerprint, StoredAnswer,
};
use crate::state::AppState;
use crate::time::{Rfc3339, now_millis};

/// `Idempotent-Replayed: true` marks an answer replayed for an `Idempotency-Key`.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// A note.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Note)]
pub struct NoteJson {
    /// Its id (a UUID).
    pub id: String,
    /// 1 to 100 characters.
    pub title: String,
    /// At most 10,000 characters; may be empty.
    pub body: String,
    /// When it was made (RFC 3339, UTC).
    #[schema(value_type = String)]
    pub created_at: Rfc3339,
    /// When it last changed (RFC 3339, UTC).
    #[schema(value_type = String)]
    pub updated_at: Rfc3339,
}

/// A page of notes, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct NoteList {
    /// The notes.
    pub items: Vec<NoteJson>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// `POST /v1/notes`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNote {
    /// 1 to 100 characters of any script, not blank, no control characters.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = String, required = true, min_length = 1, max_length = 100)]
    pub title: Option<String>,
    /// At most 10,000 characters; line breaks and tabs allowed; absent means empty.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = String, max_length = 10000)]
    pub body: Option<String>,
}

/// `PATCH /v1/notes/{id}`'s body: a field left out is unchanged (neither may be null).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoteChange {
    /// New title: 1 to 100 characters.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = String, min_length = 1, max_length = 100)]
    pub title: Option<String>,
    /// New body: at most 10,000 characters.
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = String, max_length = 10000)]
    pub body: Option<String>,
}

/// A field that may be left out but not sent as `null` (which names the field at fault).
fn some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// `GET /v1/notes`'s query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20, also when sent empty).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
}

/// A note as the API shows it (its strings moved, not copied).
fn json(note: Note) -> NoteJson {
    NoteJson {
        id: note.id.into_string(),
        title: note.title.into_string(),
        body: note.body.into_string(),
        created_at: Rfc3339(note.created_at),
        updated_at: Rfc3339(note.updated_at),
    }
}

/// The note an `{id}` names, if it could be one: anything else is the same 404.
fn note_id(id: Result<Path<String>, PathRejection>) -> Result<NoteId, ApiError> {
    id.ok()
        .and_then(|Path(id)| NoteId::parse(&id))
        .ok_or_else(ApiError::not_found)
}

/// The request's `Idempotency-Key`, if it has one (sent twice: refused).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid(
            IDEMPOTENCY_KEY_HEADER,
            "invalid_argument",
            "send one Idempotency-Key",
        ));
    }
    IdempotencyKey::parse(value.as_bytes()).map(Some)
}

/// A creation's answer: 201, the note's `Location`, the stored JSON body.
fn created(answer: StoredAnswer, replayed: bool) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(answer.status).map_err(ApiError::internal)?;
    let location = HeaderValue::try_from(format!("/v1/notes/{}", answer.note_id))
        .map_err(ApiError::internal)?;
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(JSON_UTF8)),
            (header::LOCATION, location),
        ],
        answer.body,
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Make a note.
#[utoipa::path(
    post, path = "/v1/notes", tag = "notes",
    request_body = NewNote,
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "1 to 255 printable ASCII characters, scoped to the user. A retry \
                with the same key and body within 24 hours gets the first answer again (and \
                `Idempotent-Replayed: true`) instead of a second note; the same key with \
                another body is refused with 422."),
    ),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The note made (or, replayed, the one the first request made)", body = NoteJson,
            headers(
                ("Location" = String, description = "`/v1/notes/{id}`"),
                ("Idempotent-Replayed" = String, description = "`true` on a replayed answer"),
            )),
        (status = 400, description = "invalid_argument (with field: title, body, Idempotency-Key), invalid_request (with field), invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 413, description = "payload_too_large", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 422, description = "idempotency_key_reused: the key came before with another body", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn create_note(
    State(state): State<AppState>,
    auth: Authenticated,
    headers: HeaderMap,
    Json(body): Json<NewNote>,
) -> Result<Response, ApiError> {
    let title = body
        .title
        .as_deref()
        .ok_or_else(|| ApiError::invalid("title", "invalid_argument", "title is required"))?;
    let title = NoteTitle::parse(title)?;
    let note_body = NoteBody::parse(body.body.as_deref().unwrap_or_default())?;
    let key = idempotency_key(&headers)?;

    let note = Note::new(title, note_body, now_millis());
    let answer = StoredAnswer {
        status: StatusCode::CREATED.as_u16(),
        note_id: note.id.as_str().to_owned(),
        body: serde_json::to_vec(&json(note.clone())).map_err(ApiError::internal)?,
    };
    let idempotent = key.map(|key| Idempotent {
        key,
        fingerprint: RequestFingerprint::of_create(&note.title, &note.body),
        answer: answer.clone(),
    });
    match state
        .notes
        .create(&auth.identity.openid, &note, idempotent)
        .await?
    {
        Created::New => created(answer, false),
        Created::Replayed(first) => created(first, true),
    }
}

/// The caller's notes, newest first.
#[utoipa::path(
    get, path = "/v1/notes", tag = "notes",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of notes", body = NoteList),
        (status = 400, description = "invalid_argument (with field: limit, cursor), invalid_request", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn list_notes(
    State(state): State<AppState>,
    auth: Authenticated,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<axum::Json<NoteList>, ApiError> {
    let Query(query) = query.map_err(|e| {
        // Its only failure with these fields: one of them sent twice (`limit=1&limit=2`).
        let text = e.body_text();
        let error = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the query string is malformed: {text}"),
        );
        match ["limit", "cursor"]
            .into_iter()
            .find(|field| text.contains(&format!("`{field}`")))
        {
            Some(field) => error.with_field(field),
            None => error,
        }
    })?;
    let size = PageSize::parse(query.limit.as_deref())?;
    let cursor = Cursor::parse(query.cursor.as_deref())?;
    let page = state
        .notes
        .list(&auth.identity.openid, size, cursor)
        .await?;
    Ok(axum::Json(NoteList {
        items: page.items.into_iter().map(json).collect(),
        next_cursor: page.next.map(Cursor::encode),
    }))
}

/// One of the caller's notes.
#[utoipa::path(
    get, path = "/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The note", body = NoteJson),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 404, description = "not_found: no note of the caller's has this id", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn get_note(
    State(state): State<AppState>,
    auth: Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<NoteJson>, ApiError> {
    let id = note_id(id)?;
    let note = state.notes.get(&auth.identity.openid, &id).await?;
    Ok(axum::Json(json(note)))
}

/// Change a note's title or body.
#[utoipa::path(
    patch, path = "/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note's id")),
    request_body = NoteChange,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The note after the change", body = NoteJson),
        (status = 400, description = "invalid_argument (with field: title, body), invalid_request (with field), invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 404, description = "not_found: no note of the caller's has this id", body = ErrorEnvelope),
        (status = 413, description = "payload_too_large", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn patch_note(
    State(state): State<AppState>,
    auth: Authenticated,
    id: Result<Path<String>, PathRejection>,
    Json(body): Json<NoteChange>,
) -> Result<axum::Json<NoteJson>, ApiError> {
    // The body is checked before the id, so that what the id names never changes the answer
    // to a bad body.
    let patch = NotePatch {
        title: body.title.as_deref().map(NoteTitle::parse).transpose()?,
        body: body.body.as_deref().map(NoteBody::parse).transpose()?,
    };
    let id = note_id(id)?;
    let note = state
        .notes
        .update(&auth.identity.openid, &id, patch, now_millis())
        .await?;
    Ok(axum::Json(json(note)))
}

/// Delete a note.
#[utoipa::path(
    delete, path = "/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note's id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; no body"),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 404, description = "not_found: no note of the caller's has this id", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn delete_note(
    State(state): State<AppState>,
    auth: Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = note_id(id)?;
    state.notes.delete(&auth.identity.openid, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_answer_is_the_note_json() {
        let note = Note::new(
            NoteTitle::parse("t").expect("title"),
            NoteBody::parse("b\nc").expect("body"),
            1_795_564_265_123,
        );
        let v = serde_json::to_value(json(note.clone())).expect("json");
        assert_eq!(v["id"], note.id.as_str());
        assert_eq!(v["title"], "t");
        assert_eq!(v["body"], "b\nc");
        assert_eq!(v["created_at"], "2026-11-24T23:51:05.123Z");
        assert_eq!(v["updated_at"], v["created_at"]);
        assert_eq!(v.as_object().map(serde_json::Map::len), Some(5));
    }

    #[test]
    fn one_idempotency_key_at_most() {
        let mut h = HeaderMap::new();
        assert!(idempotency_key(&h).expect("none").is_none());
        h.append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("k1"));
        assert_eq!(
            idempotency_key(&h)
                .expect("one")
                .map(|k| k.as_str().to_owned()),
            Some("k1".to_owned())
        );
        h.append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("k2"));
        let e = idempotency_key(&h).expect_err("two");
        assert_eq!(e.code(), "invalid_argument");
    }

    #[test]
    fn any_id_that_is_not_a_note_id_is_not_found() {
        let e = note_id(Ok(Path("42".to_owned()))).expect_err("sequential");
        assert_eq!((e.status(), e.code()), (StatusCode::NOT_FOUND, "not_found"));
        let id = NoteId::fresh();
        assert_eq!(
            note_id(Ok(Path(id.as_str().to_owned()))).expect("a note id"),
            id
        );
    }

    #[test]
    fn the_document_lists_every_answer_of_every_notes_route() {
        let doc: serde_json::Value =
            serde_json::from_str(&crate::routes::openapi().to_json().expect("json"))
                .expect("valid json");
        for (path, method, statuses) in [
            (
                "/v1/notes",
                "post",
                &["201", "400", "401", "413", "415", "422", "503"][..],
            ),
            ("/v1/notes", "get", &["200", "400", "401", "503"][..]),
            ("/v1/notes/{id}", "get", &["200", "401", "404", "503"][..]),
            (
                "/v1/notes/{id}",
                "patch",
                &["200", "400", "401", "404", "413", "415", "503"][..],
            ),
            (
                "/v1/notes/{id}",
                "delete",
                &["204", "401", "404", "503"][..],
            ),
        ] {
            let op = &doc["paths"][path][method];
            assert_eq!(op["tags"][0], "notes", "{method} {path}");
            for status in statuses {
                let answer = &op["responses"][status];
                assert!(answer.is_object(), "{method} {path} {status}");
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        answer["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorEnvelope",
                        "{method} {path} {status}"
                    );
                }
            }
        }
        let note = &doc["components"]["schemas"]["Note"];
        assert_eq!(note["required"].as_array().map(Vec::len), Some(5));
        let list = &doc["components"]["schemas"]["NoteList"];
        assert_eq!(
            list["required"],
            serde_json::json!(["items", "next_cursor"])
        );
    }
}
