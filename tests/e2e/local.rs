//! `wxauth-local`, the README's first command: it starts the pair on embedded defaults, the
//! phone's walk-through works against it, and when one of its three processes dies the
//! launcher stops the other two and exits with an error that names it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::harness::Process;
use tests::harness::sim::http_client;

/// The launcher, started in a fresh directory with every listener on a free port.
struct Local {
    process: Process,
    dir: tempfile::TempDir,
}

impl Local {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let env: Vec<(String, String)> = [
            ("WXAUTH_SKIP_BUILD", "1"),
            ("WECHAT_SIM_ADDR", "127.0.0.1:0"),
            ("AUTH_GRPC_ADDR", "127.0.0.1:0"),
            ("API_HTTP_ADDR", "127.0.0.1:0"),
            ("AUTH_METRICS_ADDR", "127.0.0.1:0"),
            ("API_METRICS_ADDR", "127.0.0.1:0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let process = Process::spawn("wxauth-local", &env, dir.path()).expect("wxauth-local");
        Self { process, dir }
    }

    /// The `http://` address the banner gives for `what`, waiting up to 60 s for the banner.
    async fn url(&self, what: &str) -> String {
        for _ in 0..600 {
            let logs = self.process.logs();
            let found = logs.iter().find_map(|l| {
                let rest = l.trim_start().strip_prefix(what)?;
                let url = rest.split_whitespace().next()?;
                url.starts_with("http://").then(|| url.to_owned())
            });
            if let Some(url) = found {
                return url;
            }
            if let Some(failed) = logs.iter().find(|l| l.starts_with("wxauth-local: ")) {
                panic!("{failed}; it wrote:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no {what} line in the banner; wxauth-local wrote:\n{}",
            self.process.logs().join("\n")
        );
    }

    /// The process id of the launcher's child `name`, while it runs.
    fn child(&self, name: &str) -> Option<i32> {
        let parent = self.process.id()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
                let (head, tail) = stat.rsplit_once(')')?;
                let comm = head.split_once('(')?.1;
                let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == parent && comm == name).then_some(pid)
            })
    }
}

impl Drop for Local {
    /// A test that failed half-way must not leave the launcher's children running: killing
    /// the launcher (its `Process` does on drop) would orphan them.
    fn drop(&mut self) {
        for name in ["api-service", "auth-service", "wechat-sim"] {
            if let Some(pid) = self.child(name).and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// wx.login at the simulator, then the edge's login; the access token.
async fn login(http: &reqwest::Client, sim: &str, api: &str) -> String {
    let code = http
        .post(format!("{sim}/sim/login-codes"))
        .send()
        .await
        .expect("simulator")
        .bytes()
        .await
        .expect("a code");
    let code: Value = serde_json::from_slice(&code).expect("json");
    let answer = http
        .post(format!("{api}/v1/auth/login"))
        .header("content-type", "application/json")
        .body(
            json!({"code": code["code"], "device": {"id": "my-phone", "platform": "ios"}})
                .to_string(),
        )
        .send()
        .await
        .expect("login");
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&answer.bytes().await.expect("body")).expect("json");
    body["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned()
}

#[tokio::test]
async fn the_launcher_runs_the_walkthrough_and_stops_cleanly_on_sigterm() {
    let mut local = Local::start().await;
    let (sim, api) = (
        local.url("WeChat simulator").await,
        local.url("api-service").await,
    );
    let http = http_client(Duration::from_secs(10)).expect("an HTTP client");
    let token = login(&http, &sim, &api).await;
    let me = http
        .get(format!("{api}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET /v1/me");
    assert_eq!(me.status(), StatusCode::OK);
    assert!(
        local.dir.path().join("data").is_dir(),
        "the SQLite files go to ./data"
    );

    let code = local
        .process
        .stop(Duration::from_secs(40))
        .await
        .expect("exits");
    assert_eq!(code, Some(0), "{}", local.process.logs().join("\n"));
}

#[tokio::test]
async fn when_a_service_dies_the_launcher_stops_the_rest_and_says_which() {
    let mut local = Local::start().await;
    // The banner is printed once all three listen.
    local.url("api-service").await;
    let auth = local.child("auth-service").expect("auth-service runs");
    let sim = local.child("wechat-sim").expect("the simulator runs");
    let edge = local.child("api-service").expect("api-service runs");

    let pid = rustix::process::Pid::from_raw(edge).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");

    let code = local
        .process
        .wait_exit(Duration::from_secs(40))
        .await
        .expect("the launcher exits by itself");
    let logs = local.process.logs().join("\n");
    assert_eq!(code, Some(1), "{logs}");
    assert!(
        logs.contains("api-service exited") && logs.contains("stopped the others"),
        "{logs}"
    );
    for pid in [auth, sim] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "a child ({pid}) outlived the launcher"
        );
    }
}
