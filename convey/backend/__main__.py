"""``python -m convey.backend install|remove|show ...``: see :mod:`convey.backend.cli`."""

import sys

from convey.backend.cli import main

sys.exit(main())
