"""Scoring shared by ``dictbench run`` and ``dictbench eval``: one SAE's pass over
the tasks (``scoring``), each metric's declaration (better direction, tolerance,
headline) and where those facts are read from, the result records that carry
them, and what task modules share (the LLM judge, the SAE-independent results of
``dictbench eval``, the KL divergence the ``downstream`` task and the e2e methods both
use). The tasks themselves are ``dictbench.tasks``; training writes
its own ``training`` record through ``records`` here.
"""
