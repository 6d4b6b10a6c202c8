//! End-to-end tests: the real binaries, started as processes, over real HTTP and gRPC.
//! One test binary (all modules link into it); each test starts its own processes.

mod auth_login;
mod auth_ops;
mod auth_sessions;
mod auth_tokens;
mod common;
mod sim;
