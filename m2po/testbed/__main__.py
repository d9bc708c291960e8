import sys

from m2po.testbed.experiment import main

if __name__ == "__main__":
    sys.exit(main())
