"""`python -m edge_lam.cli ...`: the same as `edge-lam ...`."""

import sys

from edge_lam.cli.main import main

sys.exit(main())
