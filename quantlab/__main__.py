"""`python -m quantlab` and `torchrun ... -m quantlab`: the command line (quantlab.cli)."""

import sys

from quantlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
