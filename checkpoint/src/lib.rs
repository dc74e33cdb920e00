//! Checkpoints on object storage (DESIGN section 6).
