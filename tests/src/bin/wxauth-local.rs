//! `wxauth-local`: runs the pair locally on embedded defaults, and calls it.
//!
//! ```text
//! wxauth-local [up]                 start the WeChat simulator (127.0.0.1:9300),
//!                                   auth-service (127.0.0.1:50051) and api-service
//!                                   (127.0.0.1:8080), SQLite files in ./data
//! wxauth-local login [OPENID] [--device ID]
//!                                   what a phone does: wx.login() at the simulator, then Login
//! wxauth-local verify ACCESS_TOKEN
//! wxauth-local refresh REFRESH_TOKEN
//! wxauth-local sessions ACCESS_TOKEN
//! wxauth-local logout ACCESS_TOKEN [--all]
//! wxauth-local revoke OPENID
//! wxauth-local events OPENID
//! ```
//! Every AUTH_* / API_* setting in the environment reaches the services started by `up`
//! (WECHAT_APPID, WECHAT_SECRET and WECHAT_API_BASE are the simulator's; WECHAT_SIM_ADDR,
//! AUTH_GRPC_ADDR and API_HTTP_ADDR move the three listeners). When one of the three exits
//! on its own, `up` stops the other two and exits with an error that names it. The other commands
//! call auth-service's gRPC API directly; answers are printed as JSON.

// A command-line tool: printing its answers is its job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::v1::auth_service_client::AuthServiceClient;
use proto::v1::{self as pb};
use serde_json::{Value, json};
use tests::harness::{Process, SpawnOptions};
use tonic::transport::Channel;

const SIM_ADDR: &str = "127.0.0.1:9300";
const AUTH_ADDR: &str = "127.0.0.1:50051";
const API_ADDR: &str = "127.0.0.1:8080";
/// The simulator's default app credentials; auth-service gets the same.
const APPID: &str = "wx00000000000000d1";
const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// A key for local runs only: real deployments set their own secret AUTH_TOKEN_KEY.
const LOCAL_TOKEN_KEY: &str = "local-development-only-token-key-do-not-deploy";

fn sim_url() -> String {
    std::env::var("WXAUTH_SIM_URL").unwrap_or_else(|_| format!("http://{SIM_ADDR}"))
}

fn auth_url() -> String {
    std::env::var("WXAUTH_AUTH_URL").unwrap_or_else(|_| format!("http://{AUTH_ADDR}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wxauth-local: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> anyhow::Result<()> {
    let command = args.first().map_or("up", String::as_str);
    let arg = |i: usize, what: &str| {
        args.get(i)
            .filter(|a| !a.starts_with("--"))
            .cloned()
            .with_context(|| format!("`{command}` needs {what}"))
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    match command {
        "up" => up().await,
        "login" => {
            let openid = args.get(1).filter(|a| !a.starts_with("--")).cloned();
            let device = args
                .iter()
                .position(|a| a == "--device")
                .and_then(|i| args.get(i + 1))
                .cloned();
            login(openid, device).await
        }
        "verify" => {
            let r = client()
                .await?
                .verify(pb::VerifyRequest {
                    access_token: arg(1, "an access token")?,
                    include_phone: false,
                })
                .await?
                .into_inner();
            show(&json!({
                "openid": r.openid,
                "unionid": r.unionid,
                "session_id": r.session_id,
                "expires_at": r.expires_at.map(|t| t.seconds),
            }))
        }
        "refresh" => {
            let r = client()
                .await?
                .refresh(pb::RefreshRequest {
                    refresh_token: arg(1, "a refresh token")?,
                })
                .await?
                .into_inner();
            show(&pair_json(r.tokens.as_ref(), &r.openid, &r.session_id))
        }
        "sessions" => {
            let r = client()
                .await?
                .list_sessions(pb::ListSessionsRequest {
                    access_token: arg(1, "an access token")?,
                })
                .await?
                .into_inner();
            let items: Vec<Value> = r
                .sessions
                .iter()
                .map(|s| {
                    json!({
                        "session_id": s.session_id,
                        "device_id": s.device.as_ref().map(|d| d.id.clone()),
                        "created_at": s.created_at.map(|t| t.seconds),
                        "last_active_at": s.last_active_at.map(|t| t.seconds),
                        "current": s.current,
                    })
                })
                .collect();
            show(&json!({ "items": items }))
        }
        "logout" => {
            let r = client()
                .await?
                .logout(pb::LogoutRequest {
                    access_token: arg(1, "an access token")?,
                    all: flag("--all"),
                })
                .await?
                .into_inner();
            show(&json!({ "revoked_sessions": r.revoked_sessions }))
        }
        "revoke" => {
            let r = client()
                .await?
                .revoke_user(pb::RevokeUserRequest {
                    openid: arg(1, "an openid")?,
                })
                .await?
                .into_inner();
            show(&json!({ "revoked_sessions": r.revoked_sessions }))
        }
        "events" => {
            let r = client()
                .await?
                .list_session_events(pb::ListSessionEventsRequest {
                    openid: arg(1, "an openid")?,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let items: Vec<Value> = r
                .events
                .iter()
                .map(|e| {
                    json!({
                        "at": e.at.map(|t| t.seconds),
                        "session_id": e.session_id,
                        "kind": e.kind().as_str_name(),
                        "end_reason": e.end_reason().as_str_name(),
                        "replaced_by_device_id": e.replaced_by_device_id,
                    })
                })
                .collect();
            show(&json!({ "events": items }))
        }
        other => bail!(
            "unknown command {other:?}; commands: up, login, verify, refresh, sessions, logout, revoke, events"
        ),
    }
}

fn show(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn pair_json(p: Option<&pb::TokenPair>, openid: &str, session_id: &str) -> Value {
    json!({
        "access_token": p.map(|p| p.access_token.clone()),
        "token_type": p.map(|p| p.token_type.clone()),
        "expires_in": p.map(|p| p.expires_in),
        "refresh_token": p.map(|p| p.refresh_token.clone()),
        "refresh_expires_in": p.map(|p| p.refresh_expires_in),
        "openid": openid,
        "session_id": session_id,
    })
}

async fn client() -> anyhow::Result<AuthServiceClient<Channel>> {
    let url = auth_url();
    let channel = Channel::from_shared(url.clone())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .with_context(|| {
            format!("auth-service is not answering at {url}; start it with `wxauth-local up`")
        })?;
    Ok(AuthServiceClient::new(channel))
}

async fn login(openid: Option<String>, device: Option<String>) -> anyhow::Result<()> {
    let http = tests::harness::sim::http_client(Duration::from_secs(10))?;
    let body = match &openid {
        Some(o) => json!({ "openid": o }),
        None => json!({}),
    };
    let url = format!("{}/sim/login-codes", sim_url());
    let answer = http
        .post(&url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await
        .with_context(|| {
            format!("the simulator is not answering at {url}; start it with `wxauth-local up`")
        })?
        .error_for_status()?
        .bytes()
        .await?;
    let minted: Value =
        serde_json::from_slice(&answer).context("the simulator's answer is not JSON")?;
    let code = minted["code"]
        .as_str()
        .context("the simulator gave no code")?
        .to_owned();
    let r = client()
        .await?
        .login(pb::LoginRequest {
            code: code.clone(),
            device: device.map(|id| pb::Device {
                id,
                platform: "devtools".into(),
                model: "wxauth-local".into(),
            }),
            client_ip: "127.0.0.1".into(),
        })
        .await?
        .into_inner();
    let mut out = pair_json(r.tokens.as_ref(), &r.openid, &r.session_id);
    out["unionid"] = json!(r.unionid);
    out["is_new_user"] = json!(r.is_new_user);
    out["code"] = json!(code);
    show(&out)
}

async fn up() -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("no working directory")?;
    let echo = SpawnOptions {
        inherit_env: true,
        echo: true,
    };
    let mut sim_env = vec![
        ("WECHAT_SIM_APPID".to_owned(), APPID.to_owned()),
        ("WECHAT_SIM_SECRET".to_owned(), SECRET.to_owned()),
    ];
    if std::env::var_os("WECHAT_SIM_ADDR").is_none() {
        sim_env.push(("WECHAT_SIM_ADDR".to_owned(), SIM_ADDR.to_owned()));
    }
    let mut sim = Process::spawn_with("wechat-sim", &sim_env, &cwd, echo)?;
    let sim_addr = sim.wait_for_addr("http").await?;

    let mut auth_env = vec![
        ("WECHAT_APPID".to_owned(), APPID.to_owned()),
        ("WECHAT_SECRET".to_owned(), SECRET.to_owned()),
        ("WECHAT_API_BASE".to_owned(), format!("http://{sim_addr}")),
    ];
    for (name, default) in [
        ("AUTH_GRPC_ADDR", AUTH_ADDR),
        ("AUTH_TOKEN_KEY", LOCAL_TOKEN_KEY),
    ] {
        if std::env::var_os(name).is_none() {
            auth_env.push((name.to_owned(), default.to_owned()));
        }
    }
    let mut auth = Process::spawn_with("auth-service", &auth_env, &cwd, echo)?;
    let auth_addr = auth.wait_for_addr("grpc").await?;

    let mut api_env = vec![("API_AUTH_URL".to_owned(), format!("http://{auth_addr}"))];
    if std::env::var_os("API_HTTP_ADDR").is_none() {
        api_env.push(("API_HTTP_ADDR".to_owned(), API_ADDR.to_owned()));
    }
    let mut api = Process::spawn_with("api-service", &api_env, &cwd, echo)?;
    let api_addr = api.wait_for_addr("http").await?;
    let data: PathBuf = cwd.join("data");

    println!("{}", banner(sim_addr, auth_addr, api_addr, &data));

    // Until Ctrl-C or SIGTERM, or until one of the three exits on its own: then the pair is
    // broken, so the others are stopped too and the launcher says which one it was.
    let gone = tokio::select! {
        () = wait_for_stop() => None,
        status = sim.exited() => Some(("the WeChat simulator", status)),
        status = auth.exited() => Some(("auth-service", status)),
        status = api.exited() => Some(("api-service", status)),
    };
    for p in [&mut api, &mut auth, &mut sim] {
        // One that has already exited cannot be signalled: nothing to stop.
        let _ = p.stop(Duration::from_secs(25)).await;
    }
    match gone {
        None => Ok(()),
        Some((name, Ok(status))) => bail!("{name} exited ({status}); stopped the others"),
        Some((name, Err(e))) => bail!("lost track of {name} ({e}); stopped the others"),
    }
}

/// The README's walk-through (its "Trying it" shell block), compiled in so that what the
/// launcher prints and what the README says cannot drift apart.
fn readme_walkthrough() -> &'static str {
    let readme = include_str!("../../../README.md");
    let section = readme.find("## Trying it").map_or("", |i| &readme[i..]);
    let Some(start) = section.find("```sh\n").map(|i| i + "```sh\n".len()) else {
        return "";
    };
    let end = section[start..].find("```").map_or(start, |e| start + e);
    &section[start..end]
}

/// What `up` prints: where everything runs, and the walk-through with the real addresses.
fn banner(
    sim: std::net::SocketAddr,
    auth: std::net::SocketAddr,
    api: std::net::SocketAddr,
    data: &std::path::Path,
) -> String {
    let me = "cargo run -q -p tests --bin wxauth-local --";
    let walkthrough = readme_walkthrough()
        .replace(SIM_ADDR, &sim.to_string())
        .replace(API_ADDR, &api.to_string());
    let indented: String = walkthrough.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "\nwxauth is running locally (Ctrl-C stops it):\n  \
         api-service       http://{api}     (the mini-program's HTTP API; GET /openapi.json)\n  \
         auth-service      grpc://{auth}   (internal gRPC API)\n  \
         WeChat simulator  http://{sim}     (control API: tests/src/sim/mod.rs)\n  \
         data              {data}\n\n\
         Paste into another terminal (bash, curl):\n\n{indented}\n\
         Or through auth-service's gRPC API: {me} login | verify TOKEN | sessions TOKEN | events OPENID\n",
        data = data.display()
    )
}

async fn wait_for_stop() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {},
    }
}

#[cfg(test)]
mod banner_tests {
    use super::*;

    #[test]
    fn the_banner_prints_the_readme_walkthrough_with_the_real_addresses() {
        let block = readme_walkthrough();
        assert!(block.contains("/v1/auth/login") && block.contains("/sim/login-codes"));
        assert!(!block.chars().any(|c| c.is_control() && c != '\n'));

        let printed = banner(
            "127.0.0.1:19300".parse().expect("addr"),
            AUTH_ADDR.parse().expect("addr"),
            "127.0.0.1:18080".parse().expect("addr"),
            std::path::Path::new("data"),
        );
        assert!(printed.contains("http://127.0.0.1:18080/v1/auth/login"));
        assert!(printed.contains("http://127.0.0.1:19300/sim/login-codes"));
        assert!(!printed.contains(API_ADDR) && !printed.contains(SIM_ADDR));
    }
}
