"""``python -m launcher``: the same as the ``anytopo-launch`` console script (see :mod:`launcher.launch`)."""
import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
