"""``python -m lada ...`` is the ``lada`` command, for a checkout that is not pip-installed."""

import sys

from lada.cli import main

sys.exit(main())
