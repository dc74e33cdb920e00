//! One rank of a training job (DESIGN section 4).
