//! What the end-to-end tests, the local launcher and the benchmarks share: starting the real
//! binaries and talking to them.

pub mod api;
pub mod auth;
pub mod external;
pub mod process;
pub mod proxy;
pub mod sim;
pub mod stream;

pub use api::ApiProcess;
pub use auth::{AuthClient, AuthProcess};
pub use process::{Process, SpawnOptions};
pub use sim::SimProcess;
