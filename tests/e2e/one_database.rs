//! Both services pointed at one PostgreSQL database: the second to start refuses it with a
//! message that says so, and stays unready, instead of sqlx's "migration 1 was previously
//! applied but has been modified".

use std::time::Duration;

use reqwest::StatusCode;
use tests::harness::external::{External, postgres_database};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

#[tokio::test]
async fn the_edge_on_auth_services_database_says_each_needs_its_own_and_stays_unready() {
    let test = "one_database::the_edge_on_auth_services_database";
    let External::Run(db) = postgres_database(test).await.expect("a database") else {
        return;
    };
    let sim = SimProcess::start().await.expect("sim");
    let auth = AuthProcess::start(&sim, &[("AUTH_DATABASE_URL", db.as_str())])
        .await
        .expect("auth-service migrates the database");

    // Act: the edge is given the same database.
    let api = ApiProcess::start_for(
        &format!("http://{}", auth.addr()),
        &[("API_DATABASE_URL", db.as_str())],
        false,
    )
    .await
    .expect("api-service starts");

    // Assert: its log says why, and it never becomes ready.
    let mut said = None;
    for _ in 0..100 {
        said = api
            .logs()
            .into_iter()
            .find(|line| line.contains("another program's schema"));
        if said.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = said.unwrap_or_else(|| {
        panic!(
            "api-service never said the database holds another program's schema:\n{}",
            api.logs().join("\n")
        )
    });
    assert!(said.contains("each need a database of their own"), "{said}");
    assert!(said.contains("API_DATABASE_URL"), "{said}");
    let ready = api
        .http()
        .get(api.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}
