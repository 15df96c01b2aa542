"""The loss family every task shares, each a small module with its contract in its docstring.

* :mod:`~distill.losses.kd`: ``alpha * CE + (1 - alpha) * T**2 * D`` over full logits or top-K targets;
* :mod:`~distill.losses.divergences`: the members ``D`` of the soft term (forward/reverse KL, JSD, skew, TVD);
* :mod:`~distill.losses.topk`: the teacher's top-K logits and the mass they leave out, as stored targets;
* :mod:`~distill.losses.hidden`: matching the student's hidden states to the teacher's.

The fused kernels that compute the same contracts chunk by chunk are in :mod:`distill.kernels`.
"""
