"""Evaluation and analyses.

- :mod:`cgrpo.eval.runner` — the resumable generate / score / summarise pipeline (``scores.csv``,
  ``summary.json``, ``table.md``); :mod:`cgrpo.eval.dreambench` and :mod:`cgrpo.eval.mini` are its tasks.
- :mod:`cgrpo.eval.metrics` — metric names (DINO, CLIP-I, CLIP-T, HPS-v3, any registered reward), options.
- :mod:`cgrpo.eval.stats` — bootstrap intervals, correlations, Pareto fronts.
- :mod:`cgrpo.eval.analyses` — reward conflict, frequency of denoising, trade-off;
  :mod:`cgrpo.eval.correlation` — reward-human correlation; :mod:`cgrpo.eval.report` — Markdown/HTML report.
- :mod:`cgrpo.eval.cli` — ``eval_app``, ``analyze_app`` and ``report`` for the ``cgrpo`` command line.

Nothing heavy is imported here, so ``import cgrpo.eval`` stays fast.
"""
