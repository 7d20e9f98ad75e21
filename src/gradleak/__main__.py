"""``python -m gradleak ...``: the same as the ``gradleak`` command."""

import sys

from .cli import main

sys.exit(main())
