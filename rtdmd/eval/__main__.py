"""``python -m rtdmd.eval``: see :mod:`rtdmd.cli.eval`."""
import sys

from rtdmd.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
