"""``python -m flashdmd.planner``: the memory and FLOP planner's command line (flashdmd/apps/plan.py)."""
import sys

from flashdmd.apps.plan import cli

if __name__ == "__main__":
    sys.exit(cli())
