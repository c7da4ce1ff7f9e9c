"""``python -m rtdmd.infer``: see :mod:`rtdmd.cli.infer` (the library call is :mod:`rtdmd.eval.infer`)."""
import sys

from rtdmd.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
