"""The shared tiny-run fixtures ("worlds") in tests/worlds/ are importable from every test folder."""
import sys
from pathlib import Path

WORLDS = Path(__file__).resolve().parent / "worlds"
if str(WORLDS) not in sys.path:
    sys.path.insert(0, str(WORLDS))
