"""`python -m lorakit`: the lorakit command; what `torchrun ... -m lorakit train ...` runs in every process."""

import sys

from lorakit.cli import main

if __name__ == "__main__":  # not when a spawned process imports this module as its parent's main
    sys.exit(main())
