//! Retry schedule in Webcert's template form (DOMAIN.md §6): `30#1:m,5:m,1:h,6:h,12:h,1:d` =
//! at most 30 deliveries; after the first failed delivery wait 1 minute, after the second
//! 5 minutes, then 1 hour, 6 hours, 12 hours, and 1 day after every later one. Only technical
//! errors are retried; the caller decides which those are.
//!
//! Grammar: `max '#' delay (',' delay)*`, `delay = count ':' unit`, `unit = s | m | h | d`;
//! `max` and `count` are decimal numbers of at least 1. No spaces.

use std::fmt;
use std::time::Duration;

/// The default schedule (Webcert's status delivery).
pub const DEFAULT: &str = "30#1:m,5:m,1:h,6:h,12:h,1:d";

/// Longest single delay accepted: one year.
const MAX_DELAY_SECS: u64 = 366 * 86_400;

const TOO_LONG: &str = "a delay must be at most 366 days";

/// A time unit of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    S,
    M,
    H,
    D,
}

impl Unit {
    fn secs(self) -> u64 {
        match self {
            Unit::S => 1,
            Unit::M => 60,
            Unit::H => 3600,
            Unit::D => 86_400,
        }
    }
    fn letter(self) -> char {
        match self {
            Unit::S => 's',
            Unit::M => 'm',
            Unit::H => 'h',
            Unit::D => 'd',
        }
    }
}

/// A parsed retry schedule: how many deliveries at most and the delay before each retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    max: u32,
    /// (count, unit) as written, so that `Display` gives the template back.
    delays: Vec<(u64, Unit)>,
}

/// A template that does not parse: where (1-based character position) and which rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("retry schedule {template:?}, character {position}: {rule}")]
pub struct ScheduleError {
    /// The template as given.
    pub template: String,
    /// 1-based character position of the problem (one past the end for a missing part).
    pub position: usize,
    /// The rule that is broken.
    pub rule: String,
}

/// Parses a template such as `30#1:m,5:m,1:h,6:h,12:h,1:d`.
pub fn parse(s: &str) -> Result<RetrySchedule, ScheduleError> {
    Parser {
        s,
        chars: s.chars().collect(),
        pos: 0,
    }
    .schedule()
}

struct Parser<'a> {
    s: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, at: usize, rule: impl Into<String>) -> ScheduleError {
        ScheduleError {
            template: self.s.to_string(),
            position: at + 1,
            rule: rule.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    /// A decimal number ≥ 1 and ≤ `max`; `what` names it in errors, `too_big` is the rule
    /// broken above `max`.
    fn number(&mut self, what: &str, max: u64, too_big: &str) -> Result<u64, ScheduleError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if start == self.pos {
            let found = match self.peek() {
                Some(c) => format!("found {c:?}"),
                None => "found the end".into(),
            };
            return Err(self.err(start, format!("expected {what} (digits), {found}")));
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        let n: u64 = text
            .parse()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| self.err(start, too_big))?;
        if n == 0 {
            return Err(self.err(start, format!("{what} must be at least 1")));
        }
        Ok(n)
    }

    fn expect(&mut self, c: char, rule: &str) -> Result<(), ScheduleError> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(self.pos, rule))
        }
    }

    fn schedule(mut self) -> Result<RetrySchedule, ScheduleError> {
        let max = self.number(
            "the maximum number of deliveries",
            u32::MAX as u64,
            "the maximum number of deliveries must be at most 4294967295",
        )? as u32;
        self.expect('#', "expected '#' after the maximum number of deliveries")?;
        let mut delays = Vec::new();
        loop {
            let start = self.pos;
            let n = self.number("a delay", MAX_DELAY_SECS, TOO_LONG)?;
            self.expect(':', "expected ':' between a delay and its unit")?;
            let unit = match self.peek() {
                Some('s') => Unit::S,
                Some('m') => Unit::M,
                Some('h') => Unit::H,
                Some('d') => Unit::D,
                _ => return Err(self.err(self.pos, "the unit must be s, m, h or d")),
            };
            if n * unit.secs() > MAX_DELAY_SECS {
                return Err(self.err(start, TOO_LONG));
            }
            self.pos += 1;
            delays.push((n, unit));
            match self.peek() {
                None => break,
                Some(',') => self.pos += 1,
                Some(_) => return Err(self.err(self.pos, "expected ',' or the end after a delay")),
            }
        }
        Ok(RetrySchedule { max, delays })
    }
}

impl RetrySchedule {
    /// Parses a template such as `30#1:m,5:m,1:h,6:h,12:h,1:d` (the same as [`parse`]).
    pub fn parse(s: &str) -> Result<RetrySchedule, ScheduleError> {
        parse(s)
    }

    /// At most this many deliveries (the first one included).
    pub fn max_attempts(&self) -> u32 {
        self.max
    }

    /// How long to wait after `attempts_made` failed deliveries before the next one: zero when
    /// none was made yet; the n-th delay of the template after n attempts, the last delay
    /// repeating; `None` once `attempts_made` reaches the maximum (give up).
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        if attempts_made >= self.max {
            return None;
        }
        if attempts_made == 0 {
            return Some(Duration::ZERO);
        }
        let i = (attempts_made as usize - 1).min(self.delays.len() - 1);
        let (n, unit) = self.delays[i];
        Some(Duration::from_secs(n * unit.secs()))
    }
}

impl Default for RetrySchedule {
    /// [`DEFAULT`].
    fn default() -> Self {
        RetrySchedule {
            max: 30,
            delays: vec![
                (1, Unit::M),
                (5, Unit::M),
                (1, Unit::H),
                (6, Unit::H),
                (12, Unit::H),
                (1, Unit::D),
            ],
        }
    }
}

impl std::str::FromStr for RetrySchedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        parse(s)
    }
}

impl fmt::Display for RetrySchedule {
    /// The template form, e.g. `30#1:m,5:m,1:h,6:h,12:h,1:d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#", self.max)?;
        for (i, (n, u)) in self.delays.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}:{}", u.letter())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;
    const HOUR: u64 = 3600;
    const DAY: u64 = 86_400;

    #[test]
    fn the_default_template() {
        let s = parse(DEFAULT).unwrap();
        assert_eq!(s, RetrySchedule::default());
        assert_eq!(s.to_string(), DEFAULT);
        assert_eq!(s.max_attempts(), 30);
        let d = |n| s.delay_after(n).map(|d| d.as_secs());
        assert_eq!(d(0), Some(0));
        assert_eq!(d(1), Some(MIN));
        assert_eq!(d(2), Some(5 * MIN));
        assert_eq!(d(3), Some(HOUR));
        assert_eq!(d(4), Some(6 * HOUR));
        assert_eq!(d(5), Some(12 * HOUR));
        assert_eq!(d(6), Some(DAY));
        assert_eq!(d(7), Some(DAY));
        assert_eq!(d(29), Some(DAY));
        assert_eq!(d(30), None, "30 deliveries made: give up");
        assert_eq!(d(31), None);
        assert_eq!(d(u32::MAX), None);
        // Total time from the first delivery to the last: 1m + 5m + 1h + 6h + 12h + 24 × 1d.
        let total: u64 = (1..30).map(|n| d(n).unwrap()).sum();
        assert_eq!(total, 6 * MIN + 19 * HOUR + 24 * DAY);
        // The configuration's default is this template.
        assert_eq!(
            crate::config::RevocationConfig::default()
                .retry
                .parse::<RetrySchedule>(),
            Ok(s)
        );
    }

    #[test]
    fn other_templates_round_trip() {
        for t in ["1#1:s", "3#10:s,2:m", "1000#90:s,36:h,366:d", "5#60:m"] {
            let s = parse(t).unwrap();
            assert_eq!(s.to_string(), t);
        }
        let s = parse("1#1:s").unwrap();
        assert_eq!(s.delay_after(0), Some(Duration::ZERO));
        assert_eq!(s.delay_after(1), None, "one delivery only: no retry");
        let s = parse("3#10:s,2:m").unwrap();
        assert_eq!(s.delay_after(1), Some(Duration::from_secs(10)));
        assert_eq!(s.delay_after(2), Some(Duration::from_secs(120)));
        assert_eq!(s.delay_after(3), None);
        // More delays than deliveries: the extra ones are never used.
        let s = parse("2#1:s,2:s,3:s").unwrap();
        assert_eq!(s.delay_after(1), Some(Duration::from_secs(1)));
        assert_eq!(s.delay_after(2), None);
    }

    fn fails(t: &str, position: usize, rule: &str) {
        let e = parse(t).expect_err(t);
        assert_eq!((e.position, e.rule.as_str()), (position, rule), "{t}: {e}");
        assert!(e.to_string().contains(&format!("character {position}")));
        assert!(e.to_string().contains(t));
    }

    #[test]
    fn errors_name_position_and_rule() {
        fails(
            "",
            1,
            "expected the maximum number of deliveries (digits), found the end",
        );
        fails(
            "#1:m",
            1,
            "expected the maximum number of deliveries (digits), found '#'",
        );
        fails(
            "0#1:m",
            1,
            "the maximum number of deliveries must be at least 1",
        );
        fails(
            "99999999999#1:m",
            1,
            "the maximum number of deliveries must be at most 4294967295",
        );
        fails(
            "30",
            3,
            "expected '#' after the maximum number of deliveries",
        );
        fails("30#", 4, "expected a delay (digits), found the end");
        fails("30#m", 4, "expected a delay (digits), found 'm'");
        fails("30#1m", 5, "expected ':' between a delay and its unit");
        fails("30#1:", 6, "the unit must be s, m, h or d");
        fails("30#1:x", 6, "the unit must be s, m, h or d");
        fails("30#1:M", 6, "the unit must be s, m, h or d");
        fails("30#1:m,", 8, "expected a delay (digits), found the end");
        fails("30#1:m,0:h", 8, "a delay must be at least 1");
        fails("30#1:m;5:m", 7, "expected ',' or the end after a delay");
        fails("30#1:mm", 7, "expected ',' or the end after a delay");
        fails("30#1:m, 5:m", 8, "expected a delay (digits), found ' '");
        fails("30#367:d", 4, "a delay must be at most 366 days");
        fails("30#99999999999:s", 4, "a delay must be at most 366 days");
        fails("30#31622401:s", 4, "a delay must be at most 366 days");
        assert!(parse("30#31622400:s").is_ok());
        fails(
            " 30#1:m",
            1,
            "expected the maximum number of deliveries (digits), found ' '",
        );
        // Positions count characters, not bytes.
        fails("3#1:m,é", 7, "expected a delay (digits), found 'é'");
    }
}
