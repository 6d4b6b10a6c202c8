//! End-to-end tests: the real binaries, started as processes, over real HTTP and gRPC.
//! One test binary (all modules link into it); each test starts its own processes.

mod api_auth;
mod api_common;
mod api_notes;
mod api_sensitive;
mod api_tls;
mod auth_login;
mod auth_ops;
mod auth_sensitive;
mod auth_sessions;
mod auth_tokens;
mod common;
mod connection_age;
mod local;
mod metrics;
mod one_database;
mod postgres_down;
mod redis_down;
mod replicas;
mod rollout;
mod sim;
mod verify_cache;
