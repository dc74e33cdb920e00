//! A made straggler, for tests and for checking the simulator's straggler
//! term: `SWITCHYARD_FAULT_SLOW_RANK=RANK:MS` makes world rank RANK sleep
//! MS milliseconds at the start of every step, before its micro-batches,
//! so the other ranks of its groups wait for it at the first collective.

use std::time::Duration;

/// The variable's name.
pub const SLOW_RANK_VAR: &str = "SWITCHYARD_FAULT_SLOW_RANK";

/// How long `rank` sleeps each step (`None`: not the slow rank, or the
/// variable unset or not `RANK:MS`).
pub fn delay_of(rank: usize) -> Option<Duration> {
    parse(&std::env::var(SLOW_RANK_VAR).ok()?, rank)
}

fn parse(value: &str, rank: usize) -> Option<Duration> {
    let (slow, ms) = value.split_once(':')?;
    (slow.trim().parse::<usize>().ok()? == rank).then_some(Duration::from_millis(ms.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_rank_sleeps() {
        assert_eq!(parse("2:40", 2), Some(Duration::from_millis(40)));
        assert_eq!(parse("2:40", 1), None);
        assert_eq!(parse("2", 2), None);
        assert_eq!(parse("x:40", 2), None);
    }
}
