"""``python -m services`` is the ``pumpwatch`` command."""

from services.cli import app

app(prog_name="pumpwatch")
