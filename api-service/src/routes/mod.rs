//! The HTTP API: one module per resource, all registered through utoipa's router so that
//! `GET /openapi.json` is generated from the very routes served (a route added any other way
//! fails the test below).

pub mod auth;
pub mod health;
pub mod me;
pub mod notes;
pub mod wechat;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::{Extension, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, JSON_UTF8};
use crate::middleware::{panic_response, request_context};
use crate::state::AppState;

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body, in bytes (413 past it).
    pub body: usize,
    /// Longest a request may take (408 past it).
    pub timeout: Duration,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "wxauth api-service",
        description = "The mini-program's HTTP API. Every error answer is \
            `{\"error\": {\"code\", \"message\", \"request_id\", \"field\"?, \"wechat\"?}}`; \
            every answer carries `X-Request-Id`."
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "auth", description = "Login, refresh, logout, sessions"),
        (name = "profile", description = "The caller's profile"),
        (name = "wechat", description = "WeChat's encryptedData, decrypted"),
        (name = "notes", description = "The sample business resource: the caller's notes"),
        (name = "health", description = "Liveness and readiness"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The generated OpenAPI document, served as it is.
#[derive(Debug, Clone)]
struct OpenApiJson(Arc<String>);

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl axum::response::IntoResponse {
    ([(header::CONTENT_TYPE, JSON_UTF8)], doc.0.as_ref().clone())
}

async fn no_such_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Every route, and its description.
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (routes, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::sessions))
        .routes(routes!(me::get_me, me::patch_me))
        .routes(routes!(me::post_phone))
        .routes(routes!(wechat::decrypt))
        .routes(routes!(notes::create_note, notes::list_notes))
        .routes(routes!(
            notes::get_note,
            notes::patch_note,
            notes::delete_note
        ))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi_json))
        .split_for_parts();
    (routes, optional_logout_body(with_framework_answers(doc)))
}

/// Logout's body may be left out (or empty), but never `null`: utoipa writes a body typed
/// `LogoutBody` as required and one typed `Option<LogoutBody>` as "or null", so the type is
/// the former and this says it is optional.
fn optional_logout_body(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{RefOr, Required};
    let body = doc
        .paths
        .paths
        .get_mut("/v1/auth/logout")
        .and_then(|item| item.post.as_mut())
        .and_then(|op| op.request_body.as_mut());
    if let Some(RefOr::T(body)) = body {
        body.required = Some(Required::False);
    }
    doc
}

/// The document with what every operation may answer besides its own answers, the layers'
/// errors (a body that is not a JSON object, too large or of another media type; a request
/// over `API_REQUEST_TIMEOUT`; a failure on our side, a caught panic among them), and the headers the answers carry: `X-Request-Id` on every
/// one, `WWW-Authenticate` on 401, `Retry-After` on 429 and 503 (where the error says when
/// to come back).
fn with_framework_answers(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{
        ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type,
    };
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorEnvelope")))
                        .build(),
                )
                .build(),
        )
    };
    let header = |kind: Type, description: &str| {
        RefOr::T(
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(kind)))
                .description(Some(description))
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.patch,
            &mut item.put,
            &mut item.delete,
        ];
        for op in operations.into_iter().flatten() {
            let answers = &mut op.responses.responses;
            if op.request_body.is_some() {
                answers.entry("400".into()).or_insert_with(|| {
                    error("invalid_json (not a JSON object), invalid_request (with field)")
                });
                answers
                    .entry("413".into())
                    .or_insert_with(|| error("payload_too_large (over API_BODY_LIMIT)"));
                answers
                    .entry("415".into())
                    .or_insert_with(|| error("unsupported_media_type"));
            }
            answers
                .entry("408".into())
                .or_insert_with(|| error("request_timeout (over API_REQUEST_TIMEOUT)"));
            answers.entry("500".into()).or_insert_with(|| {
                error("internal (a failure on our side; the request id finds it in the logs)")
            });
            for (status, answer) in answers.iter_mut() {
                let RefOr::T(answer) = answer else { continue };
                answer.headers.insert(
                    "X-Request-Id".into(),
                    header(Type::String, "The request's id, echoed when well formed"),
                );
                if status == "401" {
                    answer.headers.insert(
                        "WWW-Authenticate".into(),
                        header(Type::String, "Bearer error=\"invalid_token\""),
                    );
                }
                if status == "429" || status == "503" {
                    answer.headers.insert(
                        "Retry-After".into(),
                        header(
                            Type::Integer,
                            "Seconds to wait before trying again, when known",
                        ),
                    );
                }
            }
        }
    }
    doc
}

/// The OpenAPI document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// The whole HTTP API with its layers (outermost last): the request context (request id,
/// error bodies, metrics), the time limit, panics caught, and the body limit.
pub fn router(state: AppState, limits: Limits) -> Router {
    let (routes, doc) = api();
    let doc = OpenApiJson(Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into())));
    with_layers(
        routes.fallback(no_such_route).layer(Extension(doc)),
        state,
        limits,
    )
}

/// The layers every route gets (outermost last): body limit, panics caught, time limit,
/// and the request context that gives every answer the contract's shape.
fn with_layers(routes: Router<AppState>, state: AppState, limits: Limits) -> Router {
    routes
        .layer(DefaultBodyLimit::max(limits.body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthApi;
    use crate::auth::fake::{Call, FakeAuth};

    /// The contract's endpoints (CONTRACT.md, HTTP API) that this build serves.
    const CONTRACT: &[(&str, &str)] = &[
        ("post", "/v1/auth/login"),
        ("post", "/v1/auth/refresh"),
        ("post", "/v1/auth/logout"),
        ("get", "/v1/auth/sessions"),
        ("get", "/v1/me"),
        ("patch", "/v1/me"),
        ("post", "/v1/me/phone"),
        ("post", "/v1/wechat/decrypt"),
        ("post", "/v1/notes"),
        ("get", "/v1/notes"),
        ("get", "/v1/notes/{id}"),
        ("patch", "/v1/notes/{id}"),
        ("delete", "/v1/notes/{id}"),
        ("get", "/openapi.json"),
        ("get", "/healthz"),
        ("get", "/readyz"),
    ];

    #[test]
    fn the_document_is_openapi_3_1_and_lists_every_contract_route() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi().to_json().expect("json")).expect("valid json");
        assert_eq!(doc["openapi"], "3.1.0");
        for (method, path) in CONTRACT {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is missing from /openapi.json"
            );
        }
        assert!(doc["components"]["schemas"]["ErrorEnvelope"].is_object());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn every_operation_lists_the_layers_errors_and_the_answers_headers() {
        let doc: serde_json::Value =
            serde_json::from_str(&openapi().to_json().expect("json")).expect("valid json");
        for (method, path) in CONTRACT {
            let op = &doc["paths"][path][method];
            let answers = op["responses"].as_object().expect("responses");
            for status in ["408", "500"] {
                assert!(answers.contains_key(status), "{method} {path} {status}");
            }
            if op["requestBody"].is_object() {
                for status in ["400", "413", "415"] {
                    assert!(answers.contains_key(status), "{method} {path} {status}");
                }
            }
            for (status, answer) in answers {
                let headers = &answer["headers"];
                assert!(
                    headers["X-Request-Id"].is_object(),
                    "{method} {path} {status}"
                );
                if status == "401" {
                    assert!(headers["WWW-Authenticate"].is_object(), "{method} {path}");
                }
                if status == "429" || status == "503" {
                    assert!(
                        headers["Retry-After"].is_object(),
                        "{method} {path} {status}"
                    );
                }
            }
        }
        // The server refuses `null` as logout's body: the document does not offer it.
        let logout = &doc["paths"]["/v1/auth/logout"]["post"]["requestBody"];
        let schema = &logout["content"]["application/json"]["schema"];
        assert_eq!(
            schema["$ref"], "#/components/schemas/LogoutBody",
            "{schema}"
        );
        assert_eq!(logout["required"], false, "{logout}");
        let phone = &doc["paths"]["/v1/me/phone"]["post"]["responses"];
        assert!(phone["403"].is_object());
    }

    /// Every field an answer always carries (as `null` when unknown) is `required` in the
    /// document, so that generated clients do not type it as possibly absent. The fields
    /// left out of an answer when they have no value are listed here.
    #[test]
    fn every_field_an_answer_always_carries_is_required() {
        const SOMETIMES_ABSENT: &[(&str, &str)] = &[
            ("ErrorBody", "field"),
            ("ErrorBody", "wechat"),
            ("Health", "checks"),
        ];
        let doc: serde_json::Value =
            serde_json::from_str(&openapi().to_json().expect("json")).expect("valid json");
        let schemas = &doc["components"]["schemas"];
        // The schemas the answers name, and the schemas those name, transitively.
        let mut pending: Vec<String> = Vec::new();
        collect_refs(&doc["paths"], &mut |name, in_response| {
            if in_response {
                pending.push(name);
            }
        });
        let mut seen = std::collections::BTreeSet::new();
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let schema = &schemas[&name];
            assert!(schema.is_object(), "{name} is referenced but not defined");
            collect_refs(schema, &mut |inner, _| pending.push(inner));
            let Some(properties) = schema["properties"].as_object() else {
                continue;
            };
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            for property in properties.keys() {
                let absent = SOMETIMES_ABSENT.contains(&(name.as_str(), property.as_str()));
                assert_eq!(
                    required.contains(&property.as_str()),
                    !absent,
                    "{name}.{property}: always sent is required, sometimes absent is not"
                );
            }
        }
        for name in ["Me", "SessionItem", "TokenPair", "Note", "NoteList"] {
            assert!(
                seen.contains(name),
                "{name} is not among the answers' schemas"
            );
        }
    }

    /// Calls `found(schema name, under a `responses` key)` for every `$ref` inside `value`.
    fn collect_refs(value: &serde_json::Value, found: &mut impl FnMut(String, bool)) {
        fn walk(v: &serde_json::Value, in_response: bool, found: &mut impl FnMut(String, bool)) {
            match v {
                serde_json::Value::Object(map) => {
                    for (key, inner) in map {
                        if key == "$ref" {
                            if let Some(name) = inner
                                .as_str()
                                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                            {
                                found(name.to_owned(), in_response);
                            }
                        } else {
                            walk(inner, in_response || key == "responses", found);
                        }
                    }
                }
                serde_json::Value::Array(items) => {
                    for inner in items {
                        walk(inner, in_response, found);
                    }
                }
                _ => {}
            }
        }
        walk(value, false, found);
    }

    /// A state whose auth-service is never called and whose database is a fresh file in a
    /// directory removed when the returned guard drops.
    async fn test_state() -> (AppState, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = sqlite_state(unreachable_auth(), &dir.path().join("api.db")).await;
        (state, dir)
    }

    /// A state on `auth` and a fresh SQLite database at `path`.
    async fn sqlite_state(auth: Arc<dyn AuthApi>, path: &std::path::Path) -> AppState {
        let db = crate::db::Db::open_sqlite(path).await.expect("database");
        let crate::db::Db::Sqlite(pool, one_process) = &db else {
            panic!("an SQLite path opens SQLite");
        };
        let profiles = Arc::new(crate::profile::SqliteProfiles::new(
            pool.clone(),
            one_process.turn(),
        ));
        let notes = Arc::new(crate::notes::SqliteNotes::new(
            pool.clone(),
            one_process.turn(),
        ));
        state_with(auth, db, profiles, notes)
    }

    /// A gRPC client of an auth-service that is not there.
    fn unreachable_auth() -> Arc<dyn AuthApi> {
        Arc::new(
            crate::auth::GrpcAuth::new(
                "http://127.0.0.1:9",
                Duration::from_millis(100),
                Duration::from_millis(100),
                None,
                1,
                crate::metrics::VerifyCalls::default(),
            )
            .expect("client"),
        )
    }

    fn state_with(
        auth: Arc<dyn AuthApi>,
        db: crate::db::Db,
        profiles: Arc<dyn crate::profile::ProfileStore>,
        notes: Arc<dyn crate::notes::NotesStore>,
    ) -> AppState {
        use std::sync::atomic::AtomicBool;

        AppState::new(crate::state::Shared {
            auth,
            profiles,
            notes,
            db,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            trusted_proxy_hops: 0,
            draining: Arc::new(AtomicBool::new(false)),
            readiness: crate::routes::health::Readiness::default(),
        })
    }

    async fn call(app: Router, path: &str) -> (StatusCode, Option<String>, serde_json::Value) {
        use tower::ServiceExt as _;
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .expect("request");
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let ct = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            ct,
            serde_json::from_slice(&bytes).expect("JSON body"),
        )
    }

    async fn boom() -> &'static str {
        panic!("secret detail in a panic")
    }

    #[tokio::test]
    async fn a_panic_is_a_500_and_a_slow_handler_a_408_both_in_the_contract_shape() {
        use axum::routing::get;

        let routes = Router::new().route("/boom", get(boom)).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
        let (state, _dir) = test_state().await;
        let app = with_layers(
            routes,
            state,
            Limits {
                body: 1024,
                timeout: Duration::from_millis(100),
            },
        );

        let (status, ct, body) = call(app.clone(), "/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(ct.as_deref(), Some(JSON_UTF8));
        assert_eq!(body["error"]["code"], "internal");
        assert!(!body.to_string().contains("secret detail"), "{body}");
        assert!(
            body["error"]["request_id"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );

        let (status, ct, body) = call(app, "/slow").await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(ct.as_deref(), Some(JSON_UTF8));
        assert_eq!(body["error"]["code"], "request_timeout");
    }

    #[tokio::test]
    async fn the_edge_serves_while_postgres_is_down_and_is_not_ready() {
        use secrecy::SecretString;

        // Nothing listens on port 1: the pool is lazy and the migrations wait in the background.
        let url = SecretString::from("postgres://api:pw@127.0.0.1:1/api");
        let db = crate::db::Db::open(&crate::config::DatabaseSettings::Postgres {
            url,
            max_connections: shared::postgres::DEFAULT_POOL_SIZE,
        })
        .await
        .expect("starts without PostgreSQL");
        let crate::db::Db::Postgres(pg) = &db else {
            panic!("postgres:// opens PostgreSQL");
        };
        let profiles = Arc::new(crate::profile::PgProfiles::new(pg.clone()));
        let notes = Arc::new(crate::notes::PgNotes::new(pg.clone()));
        let app = router(
            state_with(unreachable_auth(), db, profiles, notes),
            Limits {
                body: 1024,
                timeout: Duration::from_secs(30),
            },
        );

        let (status, ct, body) = call(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ct.as_deref(), Some(JSON_UTF8));
        assert_eq!(body["checks"]["database"], false, "{body}");

        let (status, _, body) = call(app, "/healthz").await;
        assert_eq!((status, &body["status"]), (StatusCode::OK, &"ok".into()));
    }

    #[tokio::test]
    async fn an_auth_service_that_never_answers_is_not_ready() {
        // Arrange: it takes the connection and never says a word; calls wait 200 ms.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let frozen = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let auth = Arc::new(
            crate::auth::GrpcAuth::new(
                &format!("http://{addr}"),
                Duration::from_millis(200),
                Duration::from_millis(200),
                None,
                1,
                crate::metrics::VerifyCalls::default(),
            )
            .expect("client"),
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = sqlite_state(auth, &dir.path().join("api.db")).await;
        // The request's own limit is far off: reaching it would be a 408, not an answer.
        let app = router(
            state,
            Limits {
                body: 1024,
                timeout: Duration::from_secs(10),
            },
        );

        // Act
        let (status, ct, body) = call(app, "/readyz").await;

        // Assert: not ready because of auth-service alone.
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(ct.as_deref(), Some(JSON_UTF8));
        assert_eq!(body["checks"]["auth_service"], false, "{body}");
        assert_eq!(body["checks"]["database"], true, "{body}");
        frozen.abort();
    }

    /// Sends `method path` with `token` as the bearer and `body` as JSON.
    async fn send(
        app: Router,
        method: axum::http::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        use tower::ServiceExt as _;
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json");
        let request = match body {
            Some(b) => request.body(axum::body::Body::from(b.to_string())),
            None => request.body(axum::body::Body::empty()),
        }
        .expect("request");
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    fn limits() -> Limits {
        Limits {
            body: 1024,
            timeout: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn the_profile_takes_one_verify_call_that_answers_the_phone_too() {
        use axum::http::Method;

        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::with_phone("13800138000"));
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;
        let app = router(state, limits());

        // Act
        let (status, me) = send(app.clone(), Method::GET, "/v1/me", "alice", None).await;

        // Assert: one Verify asking for the number, no GetPhoneNumber.
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!(me["openid"], "openid-alice");
        assert_eq!(me["phone_number"], "13800138000");
        assert_eq!(
            auth.take_calls(),
            [Call::Verify {
                include_phone: true
            }]
        );

        // Act: the change of a profile answers the profile, number included, the same way.
        let nickname = serde_json::json!({"nickname": "Zoë"});
        let (status, me) = send(
            app.clone(),
            Method::PATCH,
            "/v1/me",
            "alice",
            Some(nickname),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!(
            (&me["nickname"], &me["phone_number"]),
            (&"Zoë".into(), &"13800138000".into())
        );
        assert_eq!(
            auth.take_calls(),
            [Call::Verify {
                include_phone: true
            }]
        );

        // Act: other business routes do not ask for the number.
        let (status, page) = send(app, Method::GET, "/v1/notes", "alice", None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["items"], serde_json::json!([]));
        assert_eq!(
            auth.take_calls(),
            [Call::Verify {
                include_phone: false
            }]
        );
    }

    #[tokio::test]
    async fn an_empty_profile_patch_changes_nothing_not_even_updated_at() {
        use axum::http::Method;

        // Arrange: a profile with a nickname.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = sqlite_state(Arc::new(FakeAuth::default()), &dir.path().join("api.db")).await;
        let app = router(state, limits());
        let nickname = serde_json::json!({"nickname": "Zoë"});
        let (status, before) =
            send(app.clone(), Method::PATCH, "/v1/me", "bob", Some(nickname)).await;
        assert_eq!(status, StatusCode::OK, "{before}");
        tokio::time::sleep(Duration::from_millis(5)).await;

        // Act
        let empty = serde_json::json!({});
        let (status, after) = send(app, Method::PATCH, "/v1/me", "bob", Some(empty)).await;

        // Assert
        assert_eq!(status, StatusCode::OK, "{after}");
        assert_eq!(after, before);
    }

    #[tokio::test]
    async fn a_malformed_login_code_is_refused_at_the_edge_without_a_login_call() {
        use axum::http::Method;

        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::default());
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;
        let app = router(state, limits());

        for code in ["", "a b", "a$", "ａbc", &"a".repeat(129)] {
            // Act
            let body = serde_json::json!({"code": code});
            let (status, answer) =
                send(app.clone(), Method::POST, "/v1/auth/login", "", Some(body)).await;

            // Assert: the contract's answer, and auth-service never asked.
            assert_eq!(status, StatusCode::BAD_REQUEST, "{code:?}: {answer}");
            assert_eq!(
                answer["error"]["code"], "invalid_code",
                "{code:?}: {answer}"
            );
            assert_eq!(answer["error"]["field"], "code", "{code:?}: {answer}");
            assert_eq!(auth.take_calls(), [], "{code:?}");
        }
    }

    #[tokio::test]
    async fn a_phone_request_without_a_code_is_refused_before_get_phone_number() {
        use axum::http::Method;

        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::with_phone("13800138000"));
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;
        let app = router(state, limits());

        for body in [
            serde_json::json!({}),
            serde_json::json!({"code": ""}),
            serde_json::json!({"code": null}),
            serde_json::json!({"code": 123}),
            serde_json::json!({"code": ["phone-code-1"]}),
            serde_json::json!({"code": "phone code"}),
            serde_json::json!({"code": "a".repeat(129)}),
        ] {
            // Act
            let (status, answer) = send(
                app.clone(),
                Method::POST,
                "/v1/me/phone",
                "alice",
                Some(body.clone()),
            )
            .await;

            // Assert: the client's mistake, named; auth-service only asked who is calling.
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            assert_eq!(answer["error"]["code"], "invalid_code", "{body}: {answer}");
            assert_eq!(answer["error"]["field"], "code", "{body}: {answer}");
            assert_eq!(
                auth.take_calls(),
                [Call::Verify {
                    include_phone: false
                }],
                "{body}"
            );
        }

        // A code is still exchanged.
        let body = serde_json::json!({"code": "phone-code-1"});
        let (status, answer) = send(app, Method::POST, "/v1/me/phone", "alice", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["phone_number"], "13800138000");
        assert_eq!(
            auth.take_calls(),
            [
                Call::Verify {
                    include_phone: false
                },
                Call::PhoneNumber {
                    code: "phone-code-1".to_owned()
                }
            ]
        );
    }

    #[tokio::test]
    async fn readyz_looks_at_the_dependencies_once_for_the_requests_that_come_together() {
        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::default());
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;
        let app = router(state, limits());

        // Act: eight at once, then one more after the look has aged.
        let together = futures_util::future::join_all((0..8).map(|_| call(app.clone(), "/readyz")));
        let answers = together.await;
        let first_look = auth.take_calls();
        tokio::time::sleep(health::READY_CHECK_TTL + Duration::from_millis(50)).await;
        let (later, _, _) = call(app, "/readyz").await;

        // Assert
        for (status, _, body) in &answers {
            assert_eq!(*status, StatusCode::OK, "{body}");
            assert_eq!(body["checks"]["auth_service"], true, "{body}");
        }
        assert_eq!(
            first_look,
            [Call::Other("Health/Check")],
            "one look for all eight"
        );
        assert_eq!(later, StatusCode::OK);
        assert_eq!(
            auth.take_calls(),
            [Call::Other("Health/Check")],
            "looked again"
        );
    }

    #[tokio::test]
    async fn an_unknown_device_field_is_refused_and_names_it() {
        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::default());
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;
        let body = serde_json::json!({"code": "abc", "device": {"idd": "my-phone"}});

        // Act
        let (status, answer) = send(
            router(state, limits()),
            axum::http::Method::POST,
            "/v1/auth/login",
            "",
            Some(body),
        )
        .await;

        // Assert: as an unknown field at the top level is (by its path), and no Login.
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        assert_eq!(answer["error"]["field"], "device.idd", "{answer}");
        assert_eq!(auth.take_calls(), []);
    }

    #[tokio::test]
    async fn a_user_without_a_phone_number_sees_null() {
        // Arrange
        let dir = tempfile::tempdir().expect("a temporary directory");
        let auth = Arc::new(FakeAuth::default());
        let state = sqlite_state(auth.clone(), &dir.path().join("api.db")).await;

        // Act
        let (status, me) = send(
            router(state, limits()),
            axum::http::Method::GET,
            "/v1/me",
            "bob",
            None,
        )
        .await;

        // Assert
        assert_eq!(status, StatusCode::OK, "{me}");
        assert!(me["phone_number"].is_null(), "{me}");
        assert_eq!(me["openid"], "openid-bob");
        assert_eq!(
            auth.take_calls(),
            [Call::Verify {
                include_phone: true
            }]
        );
    }
}
