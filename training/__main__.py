"""``python -m training ...`` (also ``torchrun -m training ...``): the same as scripts/train.py."""
import launcher
from training import cli

launcher.run_main(cli)
