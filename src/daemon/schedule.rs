//! When to run the next reconcile: requests are coalesced into one run, and a burst of
//! uevents is given a quiet period so a new disk's partitions and signatures have settled
//! before it is judged. Pure: the caller passes the clock in.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Schedule {
    /// No uevent for this long ends a burst.
    quiet: Duration,
    /// A burst never holds a run back longer than this (a disk that keeps changing).
    max_settle: Duration,
    wanted: bool,
    burst_start: Option<Instant>,
    settle_until: Option<Instant>,
}

impl Schedule {
    pub fn new(quiet: Duration, max_settle: Duration) -> Schedule {
        Schedule {
            quiet,
            max_settle,
            wanted: false,
            burst_start: None,
            settle_until: None,
        }
    }

    /// Something asked for a run (startup, resync, D-Bus Apply, reload, PV change).
    pub fn request(&mut self) {
        self.wanted = true;
    }

    /// A block device appeared, changed or went away.
    pub fn uevent(&mut self, now: Instant) {
        self.wanted = true;
        let start = *self.burst_start.get_or_insert(now);
        self.settle_until = Some((now + self.quiet).min(start + self.max_settle));
    }

    /// A run should start now.
    pub fn due(&self, now: Instant) -> bool {
        self.wanted && self.settle_until.is_none_or(|t| now >= t)
    }

    /// When to look again, if a run is wanted but still settling.
    pub fn wakeup(&self) -> Option<Instant> {
        self.settle_until.filter(|_| self.wanted)
    }

    /// A run starts: it sees everything requested so far.
    pub fn start(&mut self) {
        self.wanted = false;
        self.burst_start = None;
        self.settle_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn requests_are_due_at_once_and_coalesce() {
        let t = Instant::now();
        let mut s = Schedule::new(ms(300), ms(3000));
        assert!(!s.due(t));
        s.request();
        s.request();
        assert!(s.due(t));
        s.start();
        assert!(!s.due(t), "two requests made one run");
    }

    #[test]
    fn uevent_burst_waits_for_quiet() {
        let t = Instant::now();
        let mut s = Schedule::new(ms(300), ms(3000));
        s.uevent(t);
        s.uevent(t + ms(200));
        assert!(
            !s.due(t + ms(400)),
            "the second event extended the quiet period"
        );
        assert!(s.due(t + ms(500)));
        assert_eq!(s.wakeup(), Some(t + ms(500)));
    }

    #[test]
    fn endless_burst_is_capped() {
        let t = Instant::now();
        let mut s = Schedule::new(ms(300), ms(1000));
        for i in 0..20 {
            s.uevent(t + ms(i * 100));
        }
        assert!(s.due(t + ms(1000)));
    }

    #[test]
    fn request_during_settle_waits_for_the_disk() {
        let t = Instant::now();
        let mut s = Schedule::new(ms(300), ms(3000));
        s.uevent(t);
        s.request();
        assert!(!s.due(t + ms(100)));
        assert!(s.due(t + ms(300)));
    }
}
