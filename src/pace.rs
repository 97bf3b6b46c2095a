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

    /// Waits for message `i`'s turn (pacing the load, as asked); returns when it was due. If
    /// that is not before `until` (a `--duration`'s end), waits only until then and returns
    /// `None`: a slow pace neither holds a run past its end nor sends after it.
    pub(crate) fn wait(&self, i: u64, until: Option<Instant>) -> Option<Instant> {
        let turn = match self.every {
            Some(every) => self.start + every.mul_f64(i as f64),
            None if i > 0 && !self.interval.is_zero() => Instant::now() + self.interval,
            None => return Some(Instant::now()),
        };
        let ends_first = until.is_some_and(|until| until <= turn);
        let wake = until.map_or(turn, |until| turn.min(until));
        let now = Instant::now();
        if wake > now {
            thread::sleep(wake - now);
        }
        match self.every {
            _ if ends_first => None,
            Some(_) => Some(turn),
            None => Some(Instant::now()),
        }
    }

    /// Whether messages go one at a time (each sent when its turn comes) rather than in bursts.
    pub(crate) fn is_paced(&self) -> bool {
        self.every.is_some() || !self.interval.is_zero()
    }
}
