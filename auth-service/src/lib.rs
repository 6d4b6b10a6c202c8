//! auth-service: WeChat mini-program login, opaque tokens and sessions, over gRPC.
//!
//! Layout: `config` (settings), `startup` (build, bind, serve, stop; logs are `shared::telemetry`),
//! `domain` (newtypes and rules), `crypto` (keys, hashes, encryption at rest), `wechat`
//! (WeChat's server API), `store` (durable state), `cache` (short-lived shared state),
//! `service` (what the RPCs do), `grpc` (the tonic service and the error mapping), `metrics`
//! (Prometheus, on a listener of its own).

pub mod cache;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod phones;
pub mod service;
pub mod startup;
pub mod store;
pub mod verified;
pub mod wechat;
