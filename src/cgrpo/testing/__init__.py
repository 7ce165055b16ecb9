"""Fixtures for the tests and benchmarks: tiny random models saved in the real checkpoints' layouts.

- :mod:`cgrpo.testing.policies` — the mini policy at 16x16 and tiny FLUX.1 (UNO, Kontext) / FLUX.2 [klein]
  folders (``save_tiny_uno``, ``save_tiny_kontext``, ``save_tiny_flux2_klein``);
- :mod:`cgrpo.testing.rewards` — tiny CLIP, DINO, DINO-Seg and HPSv3 checkpoints (``save_tiny_*``);
- :mod:`cgrpo.testing.humaneval` — fake evaluation runs and a human-evaluation server in a subprocess.

This package sits above the library in the import layers (``[tool.importlinter]`` in pyproject.toml): it may
import any of it, and nothing in the library imports it.
"""
