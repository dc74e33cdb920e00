//! AdamW and global-norm gradient clipping.
