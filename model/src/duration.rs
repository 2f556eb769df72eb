//! Durations as operators write them on command lines: a whole number and
//! a unit, `100ms`, `5s`, `1m`, `2h`.
//!
//! ```text
//!   "30s" ──parse──▶ Duration(30 s)
//!   "30"  ──parse──▶ Err: no unit (a bare number used to mean milliseconds,
//!                    so `--dns-ttl 30` served TTL 0)
//! ```
//!
//! One parser for every binary, so every duration flag accepts and refuses
//! the same forms and says the same thing when it refuses.

use std::time::Duration;

/// The forms [`parse`] accepts, for messages and `--help`.
pub const ACCEPTED_FORMS: &str = "a whole number and a unit: 100ms, 5s, 1m or 2h";

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A number without a unit.
    #[error("{0:?} has no unit; write {0}ms, {0}s or {0}m ({ACCEPTED_FORMS})")]
    NoUnit(String),
    /// Not a number followed by a unit.
    #[error("{0:?} is not a duration; expected {ACCEPTED_FORMS}")]
    Malformed(String),
    /// A unit other than ms, s, m and h.
    #[error("{input:?}: unknown unit {unit:?}; expected {ACCEPTED_FORMS}")]
    UnknownUnit {
        /// What was given.
        input: String,
        /// The unit in it.
        unit: String,
    },
    /// More than a `Duration` holds.
    #[error("{0:?} is too long")]
    Overflow(String),
}

/// Parses `100ms`, `5s`, `1m` or `2h`. A bare number is refused: the unit
/// is what makes `30` mean 30 seconds and not 30 milliseconds.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(DurationError::Malformed(input.to_owned()));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    let seconds_per = match unit {
        "" => return Err(DurationError::NoUnit(number.to_owned())),
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ if unit.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            return Err(DurationError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            });
        }
        _ => return Err(DurationError::Malformed(input.to_owned())),
    };
    n.checked_mul(seconds_per)
        .map(Duration::from_secs)
        .ok_or_else(|| DurationError::Overflow(input.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_required_and_read() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refusals_show_the_accepted_forms() {
        let bare = parse("30").expect_err("a bare number");
        assert_eq!(bare, DurationError::NoUnit("30".into()));
        let message = bare.to_string();
        assert!(
            message.contains("30s") && message.contains("100ms, 5s, 1m or 2h"),
            "{message}"
        );
        for bad in ["", "s", "1.5s", "-1s", "1 s", "1d", "1sec", "5s5"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(
                e.contains(ACCEPTED_FORMS) || e.contains("too long"),
                "{bad}: {e}"
            );
        }
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse("18446744073709551615h"),
            Err(DurationError::Overflow(_))
        ));
    }
}
