//! The tokio runtime a service runs on, with the number of worker threads its
//! `*_WORKER_THREADS` setting asks for: the current-thread scheduler for one, the
//! multi-threaded one for more.

use std::num::NonZeroUsize;
use std::time::Duration;

/// The most worker threads a setting may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// A `*_WORKER_THREADS` setting: unset (`None`: one per CPU), or a whole number from 1 to
/// [`MAX_WORKER_THREADS`]. The error is the problem, for the caller to put after the
/// setting's name (never the value).
pub fn worker_threads(value: Option<&str>) -> Result<Option<NonZeroUsize>, &'static str> {
    let Some(value) = value else {
        return Ok(None);
    };
    value
        .trim()
        .parse::<NonZeroUsize>()
        .ok()
        .filter(|n| n.get() <= MAX_WORKER_THREADS)
        .map(Some)
        .ok_or("must be a whole number from 1 to 1024")
}

/// The runtime with `threads` workers, or one per CPU the process may use (a container's CPU
/// limit counts). Set here rather than left to tokio, which would read `TOKIO_WORKER_THREADS`
/// and panic on a malformed value.
///
/// One worker gets tokio's current-thread scheduler rather than the multi-threaded one with a
/// single worker. The multi-threaded scheduler runs the task a task has just woken next (its
/// LIFO slot), so each request that wakes an HTTP/2 connection task makes that task write its
/// frame at once: one `writev` per gRPC call on each side of the hop. The current-thread
/// scheduler runs woken tasks in turn, so the requests ready together are written together.
/// With one worker each, that took auth-service's CPU per `GET /v1/me` from 47-62 µs to 26-38
/// and api-service's from 79-104 to 61-82 (wrk, 16 to 256 connections; docs/benchmarks-history.md).
///
/// The runtime also gets one task that only ticks every [`ANCHOR_PERIOD`]: see [`anchor`].
pub fn build(threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    rt.spawn(anchor());
    Ok(rt)
}

/// How often [`anchor`] ticks.
pub const ANCHOR_PERIOD: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`ANCHOR_PERIOD`] registered at all times, for as long as the
/// runtime lives.
///
/// tokio's time driver (1.54) wakes the I/O driver, a write to its eventfd, whenever a timer
/// is registered that is due before every timer already registered, including when there is
/// none (tokio-rs/tokio#5207; the open pull request tokio-rs/tokio#8383 would stop it). A
/// service whose only timers are its requests' deadlines (tonic's `grpc-timeout`, the edge's
/// time limit on its `Verify` call, each seconds away) then pays that system call for most
/// requests. With a timer always due sooner, a request's deadline is never the earliest and
/// registers without it. Measured with the bench (embedded, 16 to 256 in flight, one and four
/// connections, two runs each way alternated, same binaries): auth-service's CPU per `Verify`
/// 5-11 % lower at each of the six steps (e.g. 16.1 → 14.3 µs at 16 over four connections,
/// 11.5 → 10.6 at 256), and both services' per `GET /v1/me` 3-8 % lower (48.8 → 44.8 µs at
/// 16). The cost is one wake-up of an idle service every [`ANCHOR_PERIOD`].
async fn anchor() {
    let mut tick = tokio::time::interval(ANCHOR_PERIOD);
    // After a stall, tick once and go on at the period; a burst of catch-up ticks helps nothing.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_are_unset_or_whole_numbers_from_1_to_the_limit() {
        let n = |v: Option<&str>| worker_threads(v).map(|n| n.map(NonZeroUsize::get));
        assert_eq!(n(None), Ok(None));
        assert_eq!(n(Some(" 1 ")), Ok(Some(1)));
        assert_eq!(n(Some("1024")), Ok(Some(1024)));
        for bad in ["0", "1025", "-3", "two", ""] {
            assert!(n(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_runtime_runs_with_the_threads_asked_for() {
        let rt = build(NonZeroUsize::new(2)).expect("a runtime");
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(rt.metrics().num_workers(), 2);
        assert_eq!(rt.block_on(async { 40 + 2 }), 42);
    }

    #[test]
    fn each_runtime_keeps_its_anchor_timer_and_a_deadline_beyond_it_still_fires() {
        for threads in [1, 2] {
            let rt = build(NonZeroUsize::new(threads)).expect("a runtime");
            assert_eq!(rt.metrics().num_alive_tasks(), 1, "{threads} thread(s)");
            let fired = rt.block_on(async {
                // The anchor has ticked once at least: its timer is the earliest registered.
                tokio::time::sleep(ANCHOR_PERIOD + Duration::from_millis(50)).await;
                tokio::time::timeout(Duration::from_millis(300), std::future::pending::<()>())
                    .await
                    .is_err()
            });
            assert!(fired, "{threads} thread(s): the later deadline never fired");
            assert_eq!(rt.metrics().num_alive_tasks(), 1, "{threads} thread(s)");
        }
    }

    #[test]
    fn one_thread_is_the_current_thread_scheduler_and_still_runs_spawned_tasks() {
        let rt = build(NonZeroUsize::new(1)).expect("a runtime");
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let answer = rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { tx.send(40 + 2) });
            rx.await
        });
        assert_eq!(answer, Ok(42));
    }
}
