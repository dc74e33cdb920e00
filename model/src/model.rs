//! The whole model: embeddings, blocks, head, loss — forward and backward.
