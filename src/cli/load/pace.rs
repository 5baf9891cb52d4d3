//! The open-loop schedule of one connection, kept to the microsecond.
//!
//! tokio's timers fire on 1 ms ticks, so a message due between two ticks left at the next one:
//! at 5 300 certificates/s the messages left 0.8 ms late at the median and 1.9 ms at p99, and
//! since latency counts from the due time, the load generator's own lateness was counted as
//! the daemon's (docs/benchmarks.md, eighteenth session). A clock thread per connection now
//! sleeps until each message is due and hands its due time to the sender. (A `timerfd` on the
//! runtime's reactor would save the thread, but registering a descriptor with tokio is
//! `unsafe` since tokio 1.54, and the crate forbids `unsafe`.)

use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc;

/// How open-loop messages are spread over time.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrivals {
    /// One interval apart.
    Even,
    /// Exponentially distributed gaps of the same mean: the arrivals of many independent
    /// clients, bursts included.
    Poisson,
}

/// A message due this close to now leaves at once: sleeping and waking up for it costs about as
/// long.
const SLACK: Duration = Duration::from_micros(20);

/// Due times the clock thread may run ahead of the sender.
const AHEAD: usize = 1024;

/// The open-loop schedule of one connection: when each message is due. Latency counts from
/// the due time, so a message held back by the in-flight limit or a slow sender counts its
/// wait (no coordinated omission).
pub(super) struct Pace {
    /// Open loop: the due times, each sent when it comes by the connection's clock thread.
    clock: Option<mpsc::Receiver<Instant>>,
}

impl Pace {
    /// Messages of `size` certificates at `rate` certificates/s; closed loop without a rate.
    pub(super) fn new(rate: Option<f64>, size: usize, arrivals: Arrivals) -> Pace {
        let clock = rate.map(|r| {
            let interval = size as f64 / r.max(0.001);
            let (tx, rx) = mpsc::channel(AHEAD);
            std::thread::Builder::new()
                .name("load-clock".into())
                .spawn(move || tick(interval, arrivals, tx))
                .map(|_| rx)
        });
        let clock = match clock {
            Some(Ok(rx)) => Some(rx),
            Some(Err(e)) => {
                // Without its clock a connection would send nothing: give up loudly.
                panic!("cannot start the load generator's clock thread: {e}")
            }
            None => None,
        };
        Pace { clock }
    }

    /// Waits until the next message is due and returns the time its latency counts from: its
    /// due time (now, if it leaves early within [`SLACK`]); closed loop: now.
    pub(super) async fn due(&mut self) -> Instant {
        match &mut self.clock {
            Some(rx) => match rx.recv().await {
                Some(due) => due.min(Instant::now()),
                // The clock thread ended (it cannot without the receiver dropped).
                None => Instant::now(),
            },
            None => Instant::now(),
        }
    }

    /// Whether the latency counts from the due time rather than from the send.
    pub(super) fn open(&self) -> bool {
        self.clock.is_some()
    }
}

/// The clock thread: sends each due time when it comes, sleeping between (the kernel's
/// high-resolution timers, ~50 µs of slack), until the schedule is dropped. `interval`: the
/// mean gap in seconds.
fn tick(interval: f64, arrivals: Arrivals, tx: mpsc::Sender<Instant>) {
    let mut rng = rand::thread_rng();
    let mut gap = move || match arrivals {
        Arrivals::Even => Duration::from_secs_f64(interval),
        // Inverse transform: 1 - U is in (0, 1], so the logarithm is finite.
        Arrivals::Poisson => Duration::from_secs_f64(-(1.0 - rng.gen::<f64>()).ln() * interval),
    };
    let mut next = Instant::now();
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        if wait > SLACK {
            std::thread::sleep(wait);
        }
        if tx.blocking_send(next).is_err() {
            return;
        }
        next += gap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The due times are the schedule's, one interval apart (never a clock tick's), no message
    /// leaves before its due time by more than the slack, and latency never counts from a
    /// time after the message left.
    #[tokio::test(flavor = "current_thread")]
    async fn messages_leave_on_the_schedule() {
        let mut pace = Pace::new(Some(4000.0), 1, Arrivals::Even);
        assert!(pace.open());
        let iv = Duration::from_micros(250);
        let first = pace.due().await;
        let mut prev = first;
        for i in 1..400u32 {
            let t0 = pace.due().await;
            assert!(t0 <= Instant::now());
            let due = first + iv * i;
            assert!(t0 <= due, "message {i} counts from after its due time");
            assert!(t0 + SLACK >= due, "message {i} left {:?} early", due - t0);
            assert!(t0 >= prev);
            prev = t0;
        }
        assert!(prev + SLACK >= first + iv * 399, "faster than the rate");
    }

    /// Poisson arrivals keep the mean rate, with gaps of all sizes (some under a tenth of the
    /// mean, some over twice it, as exponential gaps have: ~10 % and ~14 %).
    #[tokio::test(flavor = "current_thread")]
    async fn poisson_arrivals_keep_the_mean_rate() {
        let mut pace = Pace::new(Some(10_000.0), 1, Arrivals::Poisson);
        let first = pace.due().await;
        let mut prev = first;
        let (mut short, mut long) = (0, 0);
        let n = 3000u32;
        for _ in 1..n {
            let t0 = pace.due().await;
            let gap = t0.saturating_duration_since(prev);
            short += (gap < Duration::from_micros(10)) as u32;
            long += (gap > Duration::from_micros(200)) as u32;
            prev = t0;
        }
        let mean = prev.saturating_duration_since(first) / (n - 1);
        assert!(
            mean > Duration::from_micros(80) && mean < Duration::from_micros(130),
            "mean gap {mean:?}"
        );
        assert!(
            short > n / 40 && long > n / 40,
            "short {short}, long {long}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn closed_loop_does_not_wait() {
        let mut pace = Pace::new(None, 1, Arrivals::Even);
        assert!(!pace.open());
        let before = Instant::now();
        for _ in 0..1000 {
            pace.due().await;
        }
        assert!(before.elapsed() < Duration::from_secs(1));
    }
}
