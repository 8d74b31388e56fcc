"""`python -m convey` is the `convey` command."""

import sys

from convey.cli import main

sys.exit(main())
