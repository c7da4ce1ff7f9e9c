"""``python -m rtdmd.cli`` = the ``rtdmd`` command."""
import sys

from rtdmd.cli.main import main

sys.exit(main())
