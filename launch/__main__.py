"""Entry point for `python -m launch`; all logic lives in launch.cli."""
import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
