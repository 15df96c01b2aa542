"""One-shot pruning (SparseGPT, Wanda, magnitude), layer by layer: :mod:`distill.pruning.oneshot.sequential`."""
