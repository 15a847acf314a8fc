//! Log lines that peers can cause (a refused record, a bad envelope) are written at most a few
//! times a minute: a flood of bad input is counted by the metrics, not copied line by line into
//! the operator's or user's log.

use std::time::{Duration, Instant};

/// Lines written per window; the rest are counted and reported with the next one written.
pub const LINES_PER_WINDOW: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct LogBudget {
    window_started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogBudget {
    /// Whether a line may be written now; if so, how many were suppressed before it.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.window_started.is_none_or(|started| now.duration_since(started) >= WINDOW) {
            self.window_started = Some(now);
            self.written = 0;
        }
        if self.written >= LINES_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_a_few_lines_a_minute_and_counts_the_rest() {
        let mut budget = LogBudget::default();
        let start = Instant::now();
        let written = (0..10_000).filter(|_| budget.allow(start).is_some()).count();
        assert_eq!(written, LINES_PER_WINDOW as usize);
        assert_eq!(budget.allow(start + WINDOW), Some(10_000 - u64::from(LINES_PER_WINDOW)), "the next line says how many were left out");
    }
}
