"""Leaderboard defaults the CLI shows in ``--help``, kept apart from ``leaderboard.py`` so
that building the parser does not import pandas and numpy (``--help`` must stay fast)."""

DEFAULT_TARGET_L0 = (16.0, 32.0, 64.0, 128.0)
DEFAULT_MATCHED_METRICS = ("ce_loss_recovered", "explained_variance", "delta_ce")
FORMATS = ("terminal", "markdown", "csv", "json")
