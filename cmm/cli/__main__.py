"""``python -m cmm.cli``, the same as the console script."""

import sys

from cmm.cli.main import main

sys.exit(main())
