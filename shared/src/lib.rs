//! What auth-service and api-service need alike, kept in one place: the async runtime each
//! binary starts ([`runtime`]), the lock that keeps an SQLite database to the one process
//! that opened it ([`OneProcess`]) and the order of its writes there ([`WriteTurn`]; tests
//! see a writer queued for it with [`saying_when_polled`]), a Redis connection made on first use ([`LazyRedis`]),
//! the rule that keeps values read from a database current in memory ([`Kept`]), the check
//! that a database's migration history is the service's own ([`migrations`]), the size of a
//! PostgreSQL pool ([`postgres`]), and the services' logs ([`telemetry`]).

mod code;
mod kept;
pub mod migrations;
mod one_process;
pub mod postgres;
mod redis;
pub mod runtime;
pub mod telemetry;

pub use code::{MAX_CODE_LEN, code_problem};
pub use kept::{Kept, Read, Stamp, WRITE_ENDED_LUA, WRITE_STARTED_LUA, WRITING, Write, is_writing};
pub use one_process::{OneProcess, TURN_WAIT, WriteTurn, saying_when_polled};
pub use redis::{LazyRedis, REST_AFTER_FAILURE, Rest, Unreachable, is_outage};
