//! Learning-rate schedule: linear warmup then cosine decay to `min_lr`.
