//! Durations on the command line: `90s`, `1.5s`, `500ms`, `15m`, `24h`, `7d`, or plain seconds.

use std::time::Duration;

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let not_a_duration = || format!("{text:?} is not a duration like 90s, 1.5s, 500ms, 15m, 24h or 7d");
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(not_a_duration());
    }
    let number: f64 = number.parse().map_err(|_| not_a_duration())?;
    let seconds = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m, h or d")),
    };
    // Anything beyond a century is a typo, not a duration.
    Duration::try_from_secs_f64((number * seconds).min(100.0 * 365.0 * 86_400.0)).map_err(|_| not_a_duration())
}

/// `1 h 05 min`, `3 min`, `42 s`: how long, for people.
pub fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        _ => format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("3w").is_err());
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["1.2.3s", ".5s", "5.s", "-1s", "", "1e9s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("99999999999999d"), Ok(Duration::from_secs(100 * 365 * 86_400)), "capped, not overflowing");
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(3900)), "1 h 05 min");
    }
}
