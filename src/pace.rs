//! Load mode's pacing: when each message goes, closed loop (`--interval` after the one before) or
//! open loop (`--rate`, on a fixed schedule whatever the server does).

use std::thread;
use std::time::{Duration, Instant};

/// When each message goes: `interval` after the one before (closed loop), or on a fixed
/// schedule at `rate` per second from the start (open loop), whatever happened meanwhile.
pub(crate) struct Pace {
    interval: Duration,
    every: Option<Duration>,
    start: Instant,
}

impl Pace {
    /// Starts the schedule now: `rate` messages a second if given, else `interval` apart.
    pub(crate) fn new(interval: Duration, rate: Option<f64>) -> Pace {
        Pace {
            interval,
            every: rate.map(|rate| Duration::from_secs_f64(1.0 / rate)),
            start: Instant::now(),
        }
    }

    /// Waits for message `i`'s turn (pacing the load, as asked); returns when it was due.
    pub(crate) fn wait(&self, i: u64) -> Instant {
        match self.every {
            Some(every) => {
                let due = self.start + every.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                due
            }
            None => {
                if i > 0 && !self.interval.is_zero() {
                    thread::sleep(self.interval);
                }
                Instant::now()
            }
        }
    }

    /// Whether messages go one at a time (each sent when its turn comes) rather than in bursts.
    pub(crate) fn is_paced(&self) -> bool {
        self.every.is_some() || !self.interval.is_zero()
    }
}
