import sys

from .cli import main

# Guarded: the workers are spawned, and spawn imports the parent's main module again (as __mp_main__).
if __name__ == "__main__":
    sys.exit(main())
