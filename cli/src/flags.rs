//! Value parsers shared by moectl's subcommands, so ranges are refused by clap with the flag's
//! name before anything starts.

use clap::builder::RangedU64ValueParser;

/// A count or size of at least 1.
pub fn positive<T>() -> RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
    <T as TryFrom<u64>>::Error: std::fmt::Display,
{
    RangedU64ValueParser::<T>::new().range(1..)
}
