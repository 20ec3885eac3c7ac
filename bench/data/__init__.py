"""Where activations come from: the subject model and its hooks, the corpus and its
splits, the on-disk activation cache, synthetic data with a known dictionary
(ours and SynthSAEBench's), GGUF headers read without the weights and a GGUF
model's de-quantised weights kept on disk. It imports only ``dictbench.io`` and
the shared top-level modules, so it can be used without any trainer.
"""
