//! What auth-service and api-service need alike, kept in one place: the async runtime each
//! binary starts ([`runtime`]), and the lock that keeps an SQLite database to the one
//! process that opened it ([`OneProcess`]).

mod one_process;
pub mod runtime;

pub use one_process::OneProcess;
