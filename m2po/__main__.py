import sys

from m2po.cli import main

sys.exit(main())
