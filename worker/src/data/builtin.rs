//! A built-in corpus that needs no files: a mixture of Markov sources.
//!
//! Smoke tests, examples and benchmarks need text with structure a small
//! model can learn in minutes *and* a known best possible loss, so that a
//! loss curve can be judged against a floor rather than by eye. Natural text
//! has no known floor; a Markov mixture has one we can compute exactly.
//!
//! Construction (all drawn from [`CORPUS_SEED`], so every job, rank and
//! version sees the same corpus):
//! - [`NUM_SOURCES`] sources, each an order-2 Markov chain over its own
//!   alphabet of [`ALPHABET_SIZE`] printable bytes taken from a shared pool
//!   (alphabets overlap, so the source is not given away by one byte);
//! - every context (two previous symbols) allows only a handful of next
//!   symbols with uneven probabilities — that sparsity is the learnable
//!   structure;
//! - each sequence comes from one source, chosen by the mixture weights, so
//!   MoE experts have distinct distributions to specialise on.
//!
//! Sequences start in the source's stationary distribution over contexts:
//! then every position of every sequence is distributed alike, and the mean
//! per-token conditional entropy of any sample equals
//! [`BuiltinCorpus::entropy_floor_nats`] without a warm-up bias.

use model::rng::Rng;

/// Seed of the corpus tables. Changing it changes the corpus — and every
/// golden loss recorded on it.
pub const CORPUS_SEED: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"

/// Number of Markov sources in the mixture.
pub const NUM_SOURCES: usize = 4;

/// Symbols per source alphabet.
pub const ALPHABET_SIZE: usize = 20;

/// Shared pool the source alphabets are drawn from (printable, so generated
/// samples can be read when debugging).
const POOL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 .,!";

/// Fewest and most possible next symbols per context.
const MIN_SUCCESSORS: usize = 3;
const MAX_SUCCESSORS: usize = 6;

/// Power iteration stops when no probability moves by more than this.
const STATIONARY_TOLERANCE: f64 = 1e-15;
const STATIONARY_MAX_ITERS: usize = 100_000;

/// One order-2 Markov chain. Contexts are pairs of symbol indices
/// `(a, b)` stored at `a * ALPHABET_SIZE + b`.
#[derive(Debug, Clone)]
struct Source {
    /// Symbol index → byte.
    alphabet: Vec<u8>,
    /// Per context: possible next symbols and their probabilities.
    next: Vec<Vec<(usize, f64)>>,
    /// Stationary distribution over contexts.
    stationary: Vec<f64>,
    /// Cumulative `stationary`, for drawing start contexts.
    start_cdf: Vec<f64>,
}

/// The built-in corpus: a fixed mixture of order-2 Markov sources over bytes.
#[derive(Debug, Clone)]
pub struct BuiltinCorpus {
    sources: Vec<Source>,
    /// Mixture weights (probability that a sequence comes from source s).
    weights: Vec<f64>,
}

impl Default for BuiltinCorpus {
    fn default() -> Self {
        Self::new()
    }
}

impl BuiltinCorpus {
    /// Builds the corpus tables from [`CORPUS_SEED`] (a few milliseconds).
    pub fn new() -> Self {
        let sources =
            (0..NUM_SOURCES).map(|s| Source::generate(&mut Rng::for_stream(CORPUS_SEED, &[s as u64]))).collect();
        // Equal weights: uneven ones would also be fine, but equal load makes
        // expert specialisation, not load balancing, the visible effect.
        let weights = vec![1.0 / NUM_SOURCES as f64; NUM_SOURCES];
        Self { sources, weights }
    }

    /// Vocabulary size: byte-level, 256.
    pub fn vocab(&self) -> usize {
        256
    }

    /// Number of sources in the mixture.
    pub fn num_sources(&self) -> usize {
        self.sources.len()
    }

    /// The bytes source `source` can emit.
    pub fn alphabet(&self, source: usize) -> &[u8] {
        &self.sources[source].alphabet
    }

    /// Next-byte distribution of `source` after bytes `prev2, prev1`, or
    /// `None` if that pair is not in the source's alphabet.
    pub fn next_distribution(&self, source: usize, prev2: u8, prev1: u8) -> Option<Vec<(u8, f64)>> {
        let src = &self.sources[source];
        let a = src.alphabet.iter().position(|&c| c == prev2)?;
        let b = src.alphabet.iter().position(|&c| c == prev1)?;
        Some(src.next[a * ALPHABET_SIZE + b].iter().map(|&(c, p)| (src.alphabet[c], p)).collect())
    }

    /// Entropy rate in nats per token when the source is known.
    ///
    /// Per source: the conditional entropy of the next symbol given the
    /// context, weighted by the stationary distribution of contexts; then
    /// averaged over sources by mixture weight. A model's loss cannot go
    /// below this, and in practice stays slightly above it: it must infer
    /// the source from the sequence so far, and the first target of a
    /// sequence has only one token of context.
    pub fn entropy_floor_nats(&self) -> f64 {
        self.sources
            .iter()
            .zip(&self.weights)
            .map(|(src, w)| {
                let h: f64 = src
                    .next
                    .iter()
                    .zip(&src.stationary)
                    .map(|(succ, pi)| pi * entropy(succ.iter().map(|&(_, p)| p)))
                    .sum();
                w * h
            })
            .sum()
    }

    /// Entropy in nats of the mixture's marginal token distribution: the
    /// loss of a model that learned token frequencies and nothing else.
    pub fn unigram_entropy_nats(&self) -> f64 {
        entropy(self.marginal().into_iter())
    }

    /// Marginal probability of every byte at any position of a sequence.
    pub fn marginal(&self) -> Vec<f64> {
        let mut p = vec![0.0; 256];
        for (src, w) in self.sources.iter().zip(&self.weights) {
            for (ctx, pi) in src.stationary.iter().enumerate() {
                // The token at a position is the second symbol of its context.
                p[src.alphabet[ctx % ALPHABET_SIZE] as usize] += w * pi;
            }
        }
        p
    }

    /// `sequences` sequences of 256 bytes drawn from `seed`'s own streams,
    /// concatenated: held-out text (`switchyard data sample`, and
    /// `[data] eval_source = "builtin"`).
    pub fn held_out_text(&self, sequences: usize, seed: u64) -> Vec<u8> {
        let mut text = Vec::with_capacity(sequences * 256);
        let mut seq = vec![0u32; 256];
        for i in 0..sequences {
            let mut rng = Rng::for_stream(seed, &[0x5A3F, i as u64]);
            self.generate(&mut rng, &mut seq);
            text.extend(seq.iter().map(|&t| t as u8));
        }
        text
    }

    /// Fills `out` with one sequence drawn with `rng`; returns the index of
    /// the source it came from (tests use it to check the entropy floor).
    pub fn generate(&self, rng: &mut Rng, out: &mut [u32]) -> usize {
        let s = pick(&cumulative(&self.weights), rng.uniform());
        let src = &self.sources[s];
        let ctx = pick(&src.start_cdf, rng.uniform());
        let (mut a, mut b) = (ctx / ALPHABET_SIZE, ctx % ALPHABET_SIZE);
        for (i, slot) in out.iter_mut().enumerate() {
            // The start context supplies the first two tokens; after that
            // every token is a transition.
            let sym = match i {
                0 => a,
                1 => b,
                _ => {
                    let c = sample(&src.next[a * ALPHABET_SIZE + b], rng.uniform());
                    (a, b) = (b, c);
                    c
                }
            };
            *slot = src.alphabet[sym] as u32;
        }
        s
    }
}

impl Source {
    /// Draws one source's alphabet and transition table.
    fn generate(rng: &mut Rng) -> Self {
        let alphabet: Vec<u8> = choose_distinct(rng, POOL.len(), ALPHABET_SIZE).into_iter().map(|i| POOL[i]).collect();
        let next = (0..ALPHABET_SIZE * ALPHABET_SIZE)
            .map(|_| {
                let k = MIN_SUCCESSORS + rng.below((MAX_SUCCESSORS - MIN_SUCCESSORS + 1) as u64) as usize;
                let symbols = choose_distinct(rng, ALPHABET_SIZE, k);
                // Dirichlet(1) weights (normalised exponentials): uneven, so
                // the entropy per context is well below ln(k).
                let raw: Vec<f64> = (0..k).map(|_| -(1.0 - rng.uniform()).ln()).collect();
                let total: f64 = raw.iter().sum();
                symbols.into_iter().zip(raw).map(|(c, r)| (c, r / total)).collect()
            })
            .collect();
        let mut src = Source { alphabet, next, stationary: Vec::new(), start_cdf: Vec::new() };
        src.stationary = src.stationary_distribution();
        src.start_cdf = cumulative(&src.stationary);
        src
    }

    /// Stationary distribution over contexts by power iteration.
    ///
    /// We iterate the lazy chain `(I + P) / 2`: it has the same stationary
    /// distributions as `P` but cannot oscillate if `P` is periodic. Starting
    /// from uniform, the limit is stationary even if some contexts are
    /// transient (they get probability 0 and are never visited).
    fn stationary_distribution(&self) -> Vec<f64> {
        let n = self.next.len();
        let mut pi = vec![1.0 / n as f64; n];
        let mut step = vec![0.0; n];
        for _ in 0..STATIONARY_MAX_ITERS {
            step.iter_mut().for_each(|x| *x = 0.0);
            for (ctx, succ) in self.next.iter().enumerate() {
                let b = ctx % ALPHABET_SIZE;
                for &(c, p) in succ {
                    step[b * ALPHABET_SIZE + c] += pi[ctx] * p;
                }
            }
            let mut change: f64 = 0.0;
            let total: f64 = step.iter().zip(&pi).map(|(s, p)| 0.5 * (s + p)).sum();
            for (p, s) in pi.iter_mut().zip(&step) {
                let new = 0.5 * (*p + s) / total;
                change = change.max((new - *p).abs());
                *p = new;
            }
            if change < STATIONARY_TOLERANCE {
                break;
            }
        }
        pi
    }
}

/// `k` distinct indices from `0..n` (partial Fisher–Yates).
fn choose_distinct(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// Running sums of `p`.
fn cumulative(p: &[f64]) -> Vec<f64> {
    p.iter()
        .scan(0.0, |acc, x| {
            *acc += x;
            Some(*acc)
        })
        .collect()
}

/// Index `i` with `cdf[i-1] <= u < cdf[i]`; zero-probability entries are
/// never picked, and rounding at the top end falls on the last positive one.
fn pick(cdf: &[f64], u: f64) -> usize {
    let i = cdf.partition_point(|&c| c <= u);
    if i < cdf.len() {
        i
    } else {
        let last = *cdf.last().expect("non-empty distribution");
        cdf.partition_point(|&c| c < last)
    }
}

/// Draws a symbol from a short `(symbol, probability)` list.
fn sample(succ: &[(usize, f64)], u: f64) -> usize {
    let mut acc = 0.0;
    for &(c, p) in succ {
        acc += p;
        if u < acc {
            return c;
        }
    }
    succ.last().expect("every context has successors").0
}

/// Shannon entropy in nats (zero probabilities contribute nothing).
fn entropy(p: impl Iterator<Item = f64>) -> f64 {
    p.filter(|&x| x > 0.0).map(|x| -x * x.ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stationary_is_a_fixed_point() {
        let corpus = BuiltinCorpus::new();
        for src in &corpus.sources {
            let mut step = vec![0.0; src.next.len()];
            for (ctx, succ) in src.next.iter().enumerate() {
                for &(c, p) in succ {
                    step[(ctx % ALPHABET_SIZE) * ALPHABET_SIZE + c] += src.stationary[ctx] * p;
                }
            }
            let err = step.iter().zip(&src.stationary).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "stationary error {err}");
            assert!((src.stationary.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn pick_skips_zero_probability_entries() {
        let cdf = cumulative(&[0.5, 0.0, 0.5, 0.0]);
        assert_eq!(pick(&cdf, 0.0), 0);
        assert_eq!(pick(&cdf, 0.5), 2);
        assert_eq!(pick(&cdf, 0.999_999), 2);
        assert_eq!(pick(&cdf, 1.0), 2);
    }
}
