//! Expert rows on the wire in bf16 mode (`[train] precision = "bf16"`):
//! each value rounded to bfloat16 (nearest, ties to even, as the matrix
//! units round), two per 32-bit word of the message, so an exchange
//! carries half the bytes; widened back to f32 (exactly) on arrival.
//!
//! The words are bit patterns, not numbers: the transports copy them
//! (all-to-all never adds), so a pattern that reads as a NaN arrives intact.

use collectives::MessageBuffer;
use model::gemm::bf16;

/// `rows` (an even number of values) as bf16 pairs: word j holds value
/// 2j in its low half and 2j+1 in its high half.
pub fn pack(rows: &[f32]) -> Vec<f32> {
    debug_assert!(rows.len().is_multiple_of(2), "bf16 rows pack in pairs");
    rows.chunks_exact(2)
        .map(|pair| {
            let (lo, hi) = (bf16::from_f32(pair[0]), bf16::from_f32(pair[1]));
            f32::from_bits(u32::from(lo) | (u32::from(hi) << 16))
        })
        .collect()
}

/// The inverse of [`pack`] (up to the rounding) into `out`, replaced.
pub fn unpack(words: &[f32], out: &mut MessageBuffer<f32>) {
    out.clear_for(2 * words.len());
    let at = out.as_mut_ptr();
    for (i, &word) in words.iter().enumerate() {
        let bits = word.to_bits();
        // SAFETY: clear_for made room for 2 x words.len() values, and
        // place 2i + 1 is below that.
        unsafe {
            at.add(2 * i).write(bf16::to_f32(bits as u16));
            at.add(2 * i + 1).write(bf16::to_f32((bits >> 16) as u16));
        }
    }
    // SAFETY: every one of the first 2 x words.len() values was written
    // above (written, not zero-filled first: this runs on every exchange).
    unsafe { out.set_len(2 * words.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_rounded_to_bf16_at_half_the_words() {
        let rows = [1.0f32, -2.5, 1.2345678, f32::MAX, 1e-40, -0.0, f32::INFINITY, 65504.0];
        let words = pack(&rows);
        assert_eq!(words.len(), rows.len() / 2);
        let mut back = MessageBuffer::new();
        unpack(&words, &mut back);
        let expected: Vec<u32> = rows.iter().map(|&x| bf16::round(x).to_bits()).collect();
        let got: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, expected);
        // A NaN stays a NaN through a word whose bits read as one.
        unpack(&pack(&[f32::NAN, 1.0]), &mut back);
        assert!(back.len() == 2 && back[0].is_nan() && back[1] == 1.0);
    }
}
