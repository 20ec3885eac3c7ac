"""Training: the shared loop, the shuffled stream of batches it draws, lockstep
groups of SAEs stepping on one batch, the data-parallel pieces and process
groups, checkpoints and resume. It reads activations from ``dictbench.data`` and
writes records through ``dictbench.score``; no other stage imports it.
"""
