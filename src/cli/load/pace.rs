//! The open-loop schedules of a run's connections, kept to the microsecond.
//!
//! tokio's timers fire on 1 ms ticks, so a message due between two ticks left at the next one:
//! at 5 300 certificates/s the messages left 0.8 ms late at the median and 1.9 ms at p99, and
//! since latency counts from the due time, the load generator's own lateness was counted as
//! the daemon's (docs/benchmarks.md, eighteenth session). One clock thread per run now sleeps
//! until the next message of any connection is due and hands its due time to that connection's
//! sender; connections whose messages fall due together (even spacing, the same rate) share
//! one wake-up. (A `timerfd` on the runtime's reactor would save the thread, but registering a
//! descriptor with tokio is `unsafe` since tokio 1.54, and the crate forbids `unsafe`.)

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

/// Due times the clock may run ahead of a connection's sender. A sender this far behind stops
/// the clock for all connections (after ~17 s of backlog at 3 850 messages/s), so it is large;
/// the channel allocates as it fills.
const AHEAD: usize = 1 << 16;

/// The open-loop schedule of one connection: when each message is due. Latency counts from
/// the due time, so a message held back by the in-flight limit or a slow sender counts its
/// wait (no coordinated omission).
pub(super) struct Pace {
    /// Open loop: the due times, each sent by the run's clock thread when it comes.
    clock: Option<mpsc::Receiver<Instant>>,
}

impl Pace {
    /// The schedules of `connections` connections, each `rate` certificates/s in messages of
    /// `size` certificates, and the clock thread that keeps them; closed loop (`rate` `None`):
    /// schedules that never wait, and no thread.
    pub(super) fn start(
        connections: usize,
        rate: Option<f64>,
        size: usize,
        arrivals: Arrivals,
    ) -> std::io::Result<Vec<Pace>> {
        let Some(rate) = rate else {
            return Ok((0..connections).map(|_| Pace::closed()).collect());
        };
        let interval = size as f64 / rate.max(0.001);
        let (txs, paces): (Vec<_>, Vec<_>) = (0..connections)
            .map(|_| {
                let (tx, rx) = mpsc::channel(AHEAD);
                (tx, Pace { clock: Some(rx) })
            })
            .unzip();
        std::thread::Builder::new()
            .name("load-clock".into())
            .spawn(move || tick(interval, arrivals, txs))?;
        Ok(paces)
    }

    /// A closed-loop schedule: every message is due now.
    pub(super) fn closed() -> Pace {
        Pace { clock: None }
    }

    /// Waits until the next message is due and returns the time its latency counts from: its
    /// due time (now, if it leaves early within [`SLACK`]); closed loop: now.
    pub(super) async fn due(&mut self) -> Instant {
        match &mut self.clock {
            Some(rx) => match rx.recv().await {
                Some(due) => due.min(Instant::now()),
                // The clock thread ended (it cannot while this receiver lives).
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

/// The clock thread: sleeps until the next message of any connection is due (the kernel's
/// high-resolution timers, ~50 µs of slack), sends the due time of every message due by then
/// to its connection, and ends when every schedule is dropped. `interval`: the mean gap
/// between a connection's messages, in seconds.
fn tick(interval: f64, arrivals: Arrivals, txs: Vec<mpsc::Sender<Instant>>) {
    let mut rng = rand::thread_rng();
    let mut gap = move || match arrivals {
        Arrivals::Even => Duration::from_secs_f64(interval),
        // Inverse transform: 1 - U is in (0, 1], so the logarithm is finite.
        Arrivals::Poisson => Duration::from_secs_f64(-(1.0 - rng.gen::<f64>()).ln() * interval),
    };
    let start = Instant::now();
    let mut live: Vec<(mpsc::Sender<Instant>, Instant)> =
        txs.into_iter().map(|tx| (tx, start)).collect();
    while let Some(next) = live.iter().map(|(_, at)| *at).min() {
        let wait = next.saturating_duration_since(Instant::now());
        if wait > SLACK {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        live.retain_mut(|(tx, at)| {
            while *at <= now + SLACK {
                if tx.blocking_send(*at).is_err() {
                    return false;
                }
                *at += gap();
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(rate: Option<f64>, arrivals: Arrivals) -> Pace {
        Pace::start(1, rate, 1, arrivals).unwrap().pop().unwrap()
    }

    /// Two connections on one clock: each keeps its own rate, evenly spaced schedules fall due
    /// together, and a connection whose schedule is dropped does not stop the other's.
    #[tokio::test(flavor = "current_thread")]
    async fn connections_share_the_clock() {
        let mut paces = Pace::start(2, Some(2000.0), 2, Arrivals::Even).unwrap();
        assert!(paces.iter().all(Pace::open));
        let mut b = paces.pop().unwrap();
        let mut a = paces.pop().unwrap();
        let iv = Duration::from_millis(1);
        let (a0, b0) = (a.due().await, b.due().await);
        assert!(a0.max(b0) - a0.min(b0) <= SLACK, "{a0:?} {b0:?}");
        for i in 1..50u32 {
            let (ta, tb) = (a.due().await, b.due().await);
            assert!(ta <= a0 + iv * i && ta + SLACK >= a0 + iv * i, "a {i}");
            assert!(tb <= b0 + iv * i && tb + SLACK >= b0 + iv * i, "b {i}");
        }
        drop(a);
        let before = b.due().await;
        let after = b.due().await;
        assert!(after > before);
    }

    /// The due times are the schedule's, one interval apart (never a clock tick's), no message
    /// leaves before its due time by more than the slack, and latency never counts from a
    /// time after the message left.
    #[tokio::test(flavor = "current_thread")]
    async fn messages_leave_on_the_schedule() {
        let mut pace = one(Some(4000.0), Arrivals::Even);
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
        let mut pace = one(Some(10_000.0), Arrivals::Poisson);
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
        let mut pace = one(None, Arrivals::Even);
        assert!(!pace.open());
        let before = Instant::now();
        for _ in 0..1000 {
            pace.due().await;
        }
        assert!(before.elapsed() < Duration::from_secs(1));
    }
}
