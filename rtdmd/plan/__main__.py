import sys

from rtdmd.plan.cli import main

sys.exit(main())
