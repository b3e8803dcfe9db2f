"""The main job on shipped data (``make demo``): see ``training/demo.py`` for what it runs and checks."""
import sys

from training.demo import main

if __name__ == "__main__":
    sys.exit(main())
