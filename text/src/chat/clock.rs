//! The clock behind the templates' `strftime_now`: the system's local time in service, a
//! fixed instant in tests (the A13B tool prompt embeds the current time and weekday).

use chrono::NaiveDateTime;
use chrono::format::{Item, StrftimeItems};

pub trait Clock: Send + Sync {
    /// Local wall-clock time, as Python's `datetime.now()` gives it to transformers.
    fn now(&self) -> NaiveDateTime;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> NaiveDateTime {
        chrono::Local::now().naive_local()
    }
}

pub struct FixedClock(pub NaiveDateTime);

impl Clock for FixedClock {
    fn now(&self) -> NaiveDateTime {
        self.0
    }
}

/// `strftime(format)` of `at`; an unknown directive, or one a naive time cannot give (`%z`,
/// `%Z`: no time zone), is an error rather than chrono's panic while formatting.
pub fn strftime(at: NaiveDateTime, format: &str) -> Result<String, String> {
    use std::fmt::Write;
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!("strftime_now: invalid format {format:?}"));
    }
    let mut out = String::new();
    write!(out, "{}", at.format_with_items(items.into_iter())).map_err(|_| {
        format!("strftime_now: {format:?} cannot be formatted (a time zone directive on a time without one?)")
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_directives_are_an_error_not_a_panic() {
        let at = NaiveDateTime::parse_from_str("2026-01-05 09:30:00", "%Y-%m-%d %H:%M:%S").unwrap();
        for format in ["%Z", "%z", "%:z", "%+"] {
            assert!(strftime(at, format).is_err(), "{format}");
        }
    }

    #[test]
    fn formats_like_python() {
        let at = NaiveDateTime::parse_from_str("2026-01-05 09:30:00", "%Y-%m-%d %H:%M:%S").unwrap();
        assert_eq!(strftime(at, "%Y-%m-%d %H:%M:%S").unwrap(), "2026-01-05 09:30:00");
        assert_eq!(strftime(at, "%A %a %d %b %Y").unwrap(), "Monday Mon 05 Jan 2026");
        assert_eq!(strftime(at, "%Q").unwrap_err(), "strftime_now: invalid format \"%Q\"");
    }
}
