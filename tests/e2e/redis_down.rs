//! auth-service on Redis (`AUTH_REDIS_URL`), and Redis going away and coming back: two real
//! auth-service processes on a `redis-server` of this test's own (so it can be killed and
//! started again on the same port), against the simulator. Each process has its own SQLite
//! database, so tokens are checked on the replica that issued them; Redis is what they share.
//!
//! Needs `redis-server` on PATH, which `scripts/services.sh` installs: the test runs when
//! `WXAUTH_TEST_REDIS_URL` says that script ran, is skipped (and says so) with
//! `WXAUTH_SKIP_EXTERNAL=1`, and fails with a message otherwise.

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use proto::v1::{LoginResponse, LogoutRequest};
use tests::harness::sim::MintCode;
use tests::harness::{AuthClient, AuthProcess, SimProcess};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{login_request, reason, tokens, verify_openid, wait_for_redis_health};

/// How long a test waits for something that should happen within seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// Whether this test runs: `WXAUTH_TEST_REDIS_URL` set (Redis is installed), or skipping
/// asked for with `WXAUTH_SKIP_EXTERNAL=1`; panics with what to do otherwise.
fn redis_installed(test: &str) -> bool {
    if std::env::var("WXAUTH_TEST_REDIS_URL").is_ok_and(|v| !v.is_empty()) {
        return true;
    }
    if std::env::var("WXAUTH_SKIP_EXTERNAL").is_ok_and(|v| v == "1") {
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs Redis (WXAUTH_SKIP_EXTERNAL=1)"
        );
        return false;
    }
    panic!(
        "{test} needs redis-server: run scripts/services.sh (it installs Redis and sets \
         WXAUTH_TEST_REDIS_URL: eval \"$(scripts/services.sh --print)\"), or set \
         WXAUTH_SKIP_EXTERNAL=1 to skip the tests that need it"
    );
}

/// A `redis-server` of this test's own on a loopback port, killed when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts redis-server on `port` (without persistence) and waits until it answers PING.
    async fn start(port: u16, dir: &Path) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server starts (it is on PATH once scripts/services.sh has run)");
        let server = Self { child, port };
        let deadline = Instant::now() + PATIENCE;
        while !server.answers().await {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} never answered PING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// True when a PING gets a PONG.
    async fn answers(&self) -> bool {
        let ping = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            s.write_all(b"PING\r\n").await?;
            let mut buf = [0_u8; 7];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(&buf == b"+PONG\r\n")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), ping).await,
            Ok(Ok(true))
        )
    }

    /// Kills it at once (SIGKILL), as a crash would.
    async fn kill(&mut self) {
        self.child.kill().await.expect("redis-server killed");
    }
}

/// A port on loopback where nothing listens now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// Logs a new user in from `ip`.
async fn login(
    sim: &SimProcess,
    client: &mut AuthClient,
    ip: &str,
) -> Result<LoginResponse, tonic::Status> {
    let minted = sim
        .mint_code(&MintCode::default())
        .await
        .expect("mint a code");
    client
        .login(login_request(&minted.code, None, ip))
        .await
        .map(tonic::Response::into_inner)
}

/// Two logins from `ip` on `a`, then one on `b`: refused when the count is shared.
async fn assert_shared_count(sim: &SimProcess, a: &mut AuthClient, b: &mut AuthClient, ip: &str) {
    login(sim, a, ip).await.expect("1st login, on A");
    login(sim, a, ip).await.expect("2nd login, on A");

    let err = login(sim, b, ip)
        .await
        .expect_err("the 3rd login, on B, is over AUTH_LOGIN_RATE=2/min");

    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "RATE_LIMITED");
}

#[tokio::test]
async fn auth_service_shares_state_through_redis_and_keeps_answering_while_redis_is_down() {
    const TEST: &str = "redis_down::auth_service_shares_state_through_redis_and_keeps_answering_while_redis_is_down";
    if !redis_installed(TEST) {
        return;
    }
    let dir = tempfile::tempdir().expect("a directory for redis-server");
    let mut redis = RedisServer::start(free_port(), dir.path()).await;
    let sim = SimProcess::start().await.expect("simulator starts");
    let url = redis.url();
    let env = [
        ("AUTH_REDIS_URL", url.as_str()),
        ("AUTH_LOGIN_RATE", "2/min"),
    ];
    let auth_a = AuthProcess::start(&sim, &env)
        .await
        .expect("auth-service A");
    let auth_b = AuthProcess::start(&sim, &env)
        .await
        .expect("auth-service B");
    let mut a = auth_a.client().await.expect("client of A");
    let mut b = auth_b.client().await.expect("client of B");
    wait_for_redis_health(&auth_a, ServingStatus::Serving).await;
    wait_for_redis_health(&auth_b, ServingStatus::Serving).await;

    // Redis up: logins work, and the rate limit is counted once for both replicas.
    assert_shared_count(&sim, &mut a, &mut b, "198.51.100.20").await;
    let before = login(&sim, &mut a, "198.51.100.21")
        .await
        .expect("a login from another IP");
    let (kept, _) = tokens(before.tokens.as_ref());
    let out = login(&sim, &mut a, "198.51.100.22")
        .await
        .expect("a login to log out");
    let (logged_out, _) = tokens(out.tokens.as_ref());
    a.logout(LogoutRequest {
        access_token: logged_out.clone(),
        all: false,
    })
    .await
    .expect("logout");

    // Redis crashes.
    redis.kill().await;
    wait_for_redis_health(&auth_a, ServingStatus::NotServing).await;
    wait_for_redis_health(&auth_b, ServingStatus::NotServing).await;

    // Answers stay correct: the service as a whole still serves, logins work (codes and
    // counts in each process's memory), Verify reads the database as always.
    assert_eq!(
        auth_a.health("").await.expect("health"),
        ServingStatus::Serving
    );
    let minted = sim
        .mint_code(&MintCode::default())
        .await
        .expect("mint a code");
    let during = a
        .login(login_request(&minted.code, None, "198.51.100.23"))
        .await
        .expect("a login while Redis is down")
        .into_inner();
    let replay = a
        .login(login_request(&minted.code, None, "198.51.100.23"))
        .await
        .expect_err("a spent code, replayed on the same replica");
    assert_eq!(reason(&replay), "CODE_USED");
    let (during_access, _) = tokens(during.tokens.as_ref());
    assert_eq!(
        verify_openid(&mut a, &during_access)
            .await
            .expect("Verify of a login during the outage"),
        during.openid
    );
    assert_eq!(
        verify_openid(&mut a, &kept)
            .await
            .expect("Verify of a login from before"),
        before.openid
    );
    let refused = verify_openid(&mut a, &logged_out)
        .await
        .expect_err("a logged-out token");
    assert_eq!(reason(&refused), "TOKEN_REVOKED");

    // Redis comes back on the same port (empty): both replicas use it again by themselves.
    let mut redis = RedisServer::start(redis.port, dir.path()).await;
    wait_for_redis_health(&auth_a, ServingStatus::Serving).await;
    wait_for_redis_health(&auth_b, ServingStatus::Serving).await;

    assert_shared_count(&sim, &mut a, &mut b, "198.51.100.24").await;
    let refused = verify_openid(&mut a, &logged_out)
        .await
        .expect_err("a logged-out token");
    assert_eq!(reason(&refused), "TOKEN_REVOKED");
    redis.kill().await;
}
