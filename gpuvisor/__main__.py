"""``python -m gpuvisor``: the ``gpuvisor`` command."""

import sys

from gpuvisor.cli import main

if __name__ == "__main__":
    sys.exit(main())
