"""`python -m tunekd`: the `tunekd` command (tunekd.cli)."""

import sys

from tunekd.cli import main

sys.exit(main())
