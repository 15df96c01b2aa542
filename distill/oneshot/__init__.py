"""One-shot pruning (SparseGPT, Wanda, magnitude), layer by layer: :mod:`distill.oneshot.sequential`."""
