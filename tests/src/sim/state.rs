//! The simulated world (users, codes, access tokens, faults, call counts, the clock) behind one lock, and the
//! settings it was started with.

use std::sync::{Arc, Mutex, PoisonError};

use super::access_token::AccessTokens;
use super::calls::CallCounts;
use super::clock::Clock;
use super::config::Settings;
use super::faults::Faults;
use super::jscode2session::LoginCodes;
use super::phone_number::PhoneCodes;
use super::users::Users;

/// The state every handler shares; cheap to clone.
#[derive(Clone, Debug)]
pub struct SimState {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: Settings,
    world: Mutex<World>,
}

/// Everything the simulator remembers; `POST /sim/reset` replaces it with a fresh one. Each
/// WeChat call's module owns its part.
#[derive(Debug, Default)]
pub(crate) struct World {
    pub(crate) clock: Clock,
    pub(crate) users: Users,
    pub(crate) faults: Faults,
    pub(crate) calls: CallCounts,
    pub(crate) login_codes: LoginCodes,
    pub(crate) access_tokens: AccessTokens,
    pub(crate) phone_codes: PhoneCodes,
}

impl SimState {
    pub fn new(settings: Settings) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                world: Mutex::new(World::default()),
            }),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Runs `f` with the world locked. `f` must not block: every request goes through here.
    pub(crate) fn with_world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        // A panic while the lock was held leaves the world as it was at that moment: still
        // usable for a simulator, so a poisoned lock is taken as it is.
        let mut world = self
            .shared
            .world
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut world)
    }
}
