"""``python -m visionattn ...`` is the ``visionattn`` command."""
import sys

from visionattn.cli import main

sys.exit(main())
