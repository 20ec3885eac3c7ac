"""Reading records back: the leaderboard and its tables, methods at matched L0, seed
statistics and intervals, Pareto plots, the static HTML page and the regression
check (``dictbench check``, with its noise-aware variant). It imports
``dictbench.score`` for each metric's facts and never training or data, so
reading results never loads a model.
"""
