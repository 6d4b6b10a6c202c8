//! api-service: the mini-program's HTTPS JSON edge.
//!
//! Not built yet: this placeholder keeps the workspace layout of `shared/STYLE.md` whole
//! and refuses to run, so nobody mistakes it for the real edge.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("api-service is not implemented yet; see the README's status section");
    ExitCode::from(2)
}
