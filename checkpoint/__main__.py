"""``python -m checkpoint`` -> the anytopo-ckpt CLI."""
import sys

from .cli import main

sys.exit(main())
