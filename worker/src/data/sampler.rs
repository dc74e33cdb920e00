//! The global batch: which tokens global sequence number `i` holds.
//!
//! DESIGN section 4: the sequences of step `s` depend only on the seed and
//! `s`, never on the number of ranks or the layout. Everything here is a
//! pure function of `(seed, global_index)`, where
//! `global_index = step * global_batch_size + i`; a data-parallel rank or a
//! micro-batch simply asks for a contiguous range of `i`. Resuming needs
//! nothing but the [`DataCursor`].

use crate::data::builtin::{BuiltinCorpus, NUM_SOURCES};
use crate::data::error::DataError;
use crate::data::prepared::{EpochOrder, PreparedData};
use model::rng::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// First element of every data stream path, keeping data randomness apart
/// from the weight-init and dropout streams drawn from the same seed.
pub const DATA_STREAM_TAG: u64 = 0xDA7A_0000_0000_0001;

/// Second path element of the stream that shuffles windows for one epoch.
const EPOCH_ORDER_TAG: u64 = 0xE90C;

/// Where training sequences come from.
#[derive(Debug)]
pub enum DataSource {
    /// The generated Markov-mixture corpus.
    Builtin(BuiltinCorpus),
    /// A folder written by `switchyard data prepare`.
    Prepared(PreparedData),
}

/// Which sequences of which step a batch holds: sequences
/// `first..first + count` of the global batch of `step`, `len` tokens each.
#[derive(Debug, Clone, Copy)]
pub struct StepSlice {
    pub seed: u64,
    pub step: u64,
    pub global_batch_size: usize,
    pub first: usize,
    pub count: usize,
    pub len: usize,
}

/// How far training has read, saved in checkpoints so that a resumed run
/// (on any layout) continues with exactly the next sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Global sequences handed out so far: the next step's first global index.
    pub sequences_consumed: u64,
}

impl DataCursor {
    /// The cursor after `steps` steps of `global_batch_size` sequences.
    pub fn after_steps(steps: u64, global_batch_size: usize) -> Self {
        Self { sequences_consumed: steps * global_batch_size as u64 }
    }

    /// Records that one more step of `global_batch_size` sequences was used.
    pub fn advance(&mut self, global_batch_size: usize) {
        self.sequences_consumed += global_batch_size as u64;
    }
}

impl DataSource {
    /// Vocabulary size of the tokens this source yields.
    pub fn vocab(&self) -> usize {
        match self {
            DataSource::Builtin(c) => c.vocab(),
            DataSource::Prepared(p) => p.vocab(),
        }
    }

    /// Checks that sequences of `len` tokens (seq_len + 1) can be drawn;
    /// call at start-up so a too-small corpus fails before any step.
    pub fn check_len(&self, len: usize) -> Result<(), DataError> {
        match self {
            DataSource::Builtin(_) => Ok(()),
            DataSource::Prepared(p) => num_windows(p, len).map(|_| ()),
        }
    }

    /// Fills `out` (length `len` = seq_len + 1: inputs and shifted targets)
    /// with global sequence `global_index`.
    pub fn sequence(&self, seed: u64, global_index: u64, len: usize, out: &mut [u32]) -> Result<(), DataError> {
        self.sequence_marked(seed, global_index, len, out, &mut [])
    }

    /// [`DataSource::sequence`], also writing each token's modality into
    /// `modality` when it is not empty: the built-in corpus's source, or
    /// the prepared folder's marks (checked by [`DataSource::check_modalities`]).
    fn sequence_marked(
        &self,
        seed: u64,
        global_index: u64,
        len: usize,
        out: &mut [u32],
        modality: &mut [u8],
    ) -> Result<(), DataError> {
        assert_eq!(out.len(), len, "output buffer must hold exactly one sequence");
        match self {
            DataSource::Builtin(corpus) => {
                let mut rng = Rng::for_stream(seed, &[DATA_STREAM_TAG, global_index]);
                let source = corpus.generate(&mut rng, out);
                modality.fill(source as u8);
                Ok(())
            }
            DataSource::Prepared(data) => {
                let windows = num_windows(data, len)?;
                let epoch = global_index / windows;
                let order = epoch_order(data, seed, epoch, len, windows);
                let window = order[(global_index % windows) as usize] as usize;
                out.copy_from_slice(&data.tokens()[window * len..(window + 1) * len]);
                if !modality.is_empty() {
                    modality.copy_from_slice(&data.modality()[window * len..(window + 1) * len]);
                }
                Ok(())
            }
        }
    }

    /// Checks that the data can give `modalities` modalities: the built-in
    /// corpus has [`NUM_SOURCES`] sources (source `s` is modality
    /// `s % modalities`); a prepared folder must mark modalities, all below
    /// `modalities`. Call at start-up, with the check of the length.
    pub fn check_modalities(&self, modalities: usize) -> Result<(), DataError> {
        if modalities <= 1 {
            return Ok(());
        }
        let err = |data: String, reason: String| Err(DataError::Modalities { data, modalities, reason });
        match self {
            DataSource::Builtin(_) if modalities > NUM_SOURCES => err(
                "builtin".into(),
                format!(
                    "the built-in corpus has {NUM_SOURCES} sources to serve as modalities; use at most {NUM_SOURCES}"
                ),
            ),
            DataSource::Builtin(_) => Ok(()),
            DataSource::Prepared(data) => {
                let folder = data.dir().display().to_string();
                let spans = &data.index().modality_spans;
                if spans.is_empty() {
                    let reason = "the folder marks no modalities: prepare it with `switchyard data prepare \
                                  --modality-per-input --input <modality 0> <modality 1> ...`";
                    return err(folder, reason.into());
                }
                match spans.iter().find(|s| s.modality as usize >= modalities) {
                    Some(span) => err(
                        format!("{folder}/index.json"),
                        format!(
                            "modality id {} from token {} on is out of range: raise modalities or re-prepare with fewer inputs",
                            span.modality, span.first_token
                        ),
                    ),
                    None => Ok(()),
                }
            }
        }
    }

    /// Sequences `first..first + count` of step `step`, concatenated
    /// (`count * len` tokens): a data-parallel rank's slice or a micro-batch.
    pub fn batch_for_step(
        &self,
        seed: u64,
        step: u64,
        global_batch_size: usize,
        first: usize,
        count: usize,
        len: usize,
    ) -> Result<Vec<u32>, DataError> {
        let at = StepSlice { seed, step, global_batch_size, first, count, len };
        Ok(self.marked_batch_for_step(at, 1)?.0)
    }

    /// [`DataSource::batch_for_step`] with each token's modality id among
    /// `modalities` (empty with one modality).
    pub fn marked_batch_for_step(&self, at: StepSlice, modalities: usize) -> Result<(Vec<u32>, Vec<u8>), DataError> {
        let StepSlice { seed, step, global_batch_size, first, count, len } = at;
        assert!(
            first + count <= global_batch_size,
            "sequences {first}..{} are outside a global batch of {global_batch_size}",
            first + count
        );
        let base = step * global_batch_size as u64 + first as u64;
        let mut out = vec![0u32; count * len];
        let mut modality = vec![0u8; if modalities > 1 { count * len } else { 0 }];
        for i in 0..count {
            let span = i * len..(i + 1) * len;
            let marks = if modality.is_empty() { &mut [][..] } else { &mut modality[span.clone()] };
            self.sequence_marked(seed, base + i as u64, len, &mut out[span], marks)?;
        }
        if let DataSource::Builtin(_) = self {
            // The corpus's source ids serve as modalities.
            modality.iter_mut().for_each(|m| *m %= modalities as u8);
        }
        Ok((out, modality))
    }
}

/// Number of non-overlapping `len`-token windows in the stream (the short
/// tail is never used); an error if there is not even one.
fn num_windows(data: &PreparedData, len: usize) -> Result<u64, DataError> {
    let tokens = data.tokens().len() as u64;
    if len == 0 || tokens < len as u64 {
        return Err(DataError::TooShort { what: format!("prepared data {}", data.dir().display()), tokens, len });
    }
    Ok(tokens / len as u64)
}

/// The shuffled window order of `epoch`, from the cache when possible.
fn epoch_order(data: &PreparedData, seed: u64, epoch: u64, len: usize, windows: u64) -> Arc<Vec<u64>> {
    let mut cache = data.order_cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cache.as_ref() {
        if c.seed == seed && c.epoch == epoch && c.len == len {
            return Arc::clone(&c.windows);
        }
    }
    let order = Arc::new(shuffled_windows(seed, epoch, windows));
    *cache = Some(EpochOrder { seed, epoch, len, windows: Arc::clone(&order) });
    order
}

/// A permutation of `0..windows` that depends only on `(seed, epoch)`
/// (Fisher–Yates), so each epoch visits every window exactly once.
pub fn shuffled_windows(seed: u64, epoch: u64, windows: u64) -> Vec<u64> {
    let mut rng = Rng::for_stream(seed, &[DATA_STREAM_TAG, EPOCH_ORDER_TAG, epoch]);
    let mut order: Vec<u64> = (0..windows).collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}
