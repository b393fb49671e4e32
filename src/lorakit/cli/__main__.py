import sys

from lorakit.cli import main

if __name__ == "__main__":  # not when a spawned engine process imports this module as its parent's main
    sys.exit(main())
