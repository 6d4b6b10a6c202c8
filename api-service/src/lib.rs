//! api-service: the mini-program's HTTPS JSON edge.
//!
//! Layout: `config` (settings), `startup` (build, bind, serve, stop; logs are `shared::telemetry`),
//! `routes/` (one module per resource), `auth/` (auth-service client and the `Authenticated`
//! extractor), `error` (the one error shape), `middleware` (request id, error bodies,
//! metrics), `json` (request bodies), `profile/` (the user's profile), `notes/` (the sample
//! business module, replaceable as a whole), `db` (the database), `metrics`, `client_ip`,
//! `time`.

pub mod auth;
pub mod client_ip;
pub mod config;
pub mod db;
pub mod error;
pub mod json;
pub mod metrics;
pub mod middleware;
pub mod notes;
pub mod profile;
mod redact;
pub mod routes;
pub mod startup;
pub mod state;
pub mod time;
