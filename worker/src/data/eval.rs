//! Evaluation windows over a token stream.

/// Windows of `seq_len + 1` tokens for evaluating a stream: window `i` is
/// `tokens[i*T .. i*T + T + 1]`, taken from the start while
/// `i*T + T + 1 <= tokens.len()`; a shorter tail is ignored.
///
/// Consecutive windows share exactly one token — the last target of window
/// `i` is the first input of window `i + 1` — so every token after the first
/// is predicted exactly once (up to the ignored tail). Panics if `seq_len`
/// is 0 (a config error caught at validation).
pub fn eval_windows(tokens: &[u32], seq_len: usize) -> impl Iterator<Item = &[u32]> {
    assert!(seq_len > 0, "eval windows need seq_len > 0");
    // i*T + T + 1 <= n  <=>  i + 1 <= (n - 1) / T
    let count = tokens.len().saturating_sub(1) / seq_len;
    (0..count).map(move |i| &tokens[i * seq_len..i * seq_len + seq_len + 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_tokens_three_windows() {
        let t: Vec<u32> = (0..10).collect();
        let w: Vec<&[u32]> = eval_windows(&t, 3).collect();
        assert_eq!(w, vec![&t[0..4], &t[3..7], &t[6..10]]);
    }

    #[test]
    fn short_tail_is_ignored() {
        let t: Vec<u32> = (0..9).collect();
        let w: Vec<&[u32]> = eval_windows(&t, 3).collect();
        assert_eq!(w, vec![&t[0..4], &t[3..7]]);
        assert_eq!(eval_windows(&t[..3], 3).count(), 0);
        assert_eq!(eval_windows(&[], 3).count(), 0);
    }
}
