"""``python -m cgrpo.humaneval ...`` runs the same commands as ``cgrpo humaneval ...``."""

from cgrpo.humaneval.cli import app

app(prog_name="cgrpo humaneval")
