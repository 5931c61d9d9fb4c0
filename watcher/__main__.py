"""Allow ``python -m watcher``, the same as the ``cni-watcher`` command."""

import sys

from watcher.cli import main

sys.exit(main())
