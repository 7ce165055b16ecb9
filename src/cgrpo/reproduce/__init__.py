"""``cgrpo reproduce``: the paper's Tables 2-5 as an experiment plan, run resumably in parallel, reported.

- :mod:`cgrpo.reproduce.plan` — the tables as data (rows, run settings, the paper's published numbers),
  budget profiles and the resolved run configs;
- :mod:`cgrpo.reproduce.runner` — executes the runs (GRPO, SFT, RPO) in parallel one-thread subprocesses,
  skipping finished ones and resuming interrupted ones;
- :mod:`cgrpo.reproduce.report` — ``report.md``: each table in the paper's layout, our numbers next to the
  published ones, the trade-off plot of all runs;
- :mod:`cgrpo.reproduce.cli` — ``reproduce_command`` (typer).
"""
