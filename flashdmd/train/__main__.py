"""``python -m flashdmd.train``: the training entry point that every launcher runs."""
import sys

from flashdmd.train.main import cli

sys.exit(cli())
