"""``python -m rtdmd.eval``: see :mod:`rtdmd.cli.eval`."""
import sys

from rtdmd.cli.eval import main

if __name__ == "__main__":
    from rtdmd.dist import exit_process

    exit_process(main())  # skips the interpreter's ~1 s teardown (rtdmd.dist.exit_process)
