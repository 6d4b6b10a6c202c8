//! wxauth's test-side crate: the WeChat simulator ([`sim`]), and the harness ([`harness`])
//! that starts the real binaries for the end-to-end tests and the local launcher.

pub mod harness;
pub mod sim;
