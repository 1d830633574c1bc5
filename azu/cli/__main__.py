"""``python -m azu.cli``: the ``azu`` command without the console script installed."""

import sys

from azu.cli import main

sys.exit(main())
