//! What auth-service and api-service need alike, kept in one place: the async runtime each
//! binary starts ([`runtime`]), the lock that keeps an SQLite database to the one process
//! that opened it ([`OneProcess`]), and a Redis connection made on first use
//! ([`LazyRedis`]).

mod one_process;
mod redis;
pub mod runtime;

pub use one_process::OneProcess;
pub use redis::LazyRedis;
