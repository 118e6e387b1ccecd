"""``python -m visionattn ...`` is the ``visionattn`` command."""
from visionattn.cli import run

run()
