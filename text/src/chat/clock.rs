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

/// `strftime(format)` of `at`; an unknown directive is an error (chrono would panic while
/// formatting it).
pub fn strftime(at: NaiveDateTime, format: &str) -> Result<String, String> {
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(format!("strftime_now: invalid format {format:?}"));
    }
    Ok(at.format_with_items(items.into_iter()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        let at = NaiveDateTime::parse_from_str("2026-01-05 09:30:00", "%Y-%m-%d %H:%M:%S").unwrap();
        assert_eq!(strftime(at, "%Y-%m-%d %H:%M:%S").unwrap(), "2026-01-05 09:30:00");
        assert_eq!(strftime(at, "%A %a %d %b %Y").unwrap(), "Monday Mon 05 Jan 2026");
        assert_eq!(strftime(at, "%Q").unwrap_err(), "strftime_now: invalid format \"%Q\"");
    }
}
