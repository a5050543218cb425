"""``python -m rwkvkit``: the ``rwkvkit`` command, for environments without the console script."""

import sys

from rwkvkit.cli import main

sys.exit(main())
