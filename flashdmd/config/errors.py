"""The one error type of the config layer: a problem the user must fix before anything runs.

A ConfigError carries every problem found at once (``problems``), one line each, each naming the
file or command line it came from, the key, the value, the rule and, where it is not obvious,
the fix. ``rules`` holds the ids of the violated cross-field rules, so the test suite can check
that every rule is reachable by some bad config.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key, file or rule."""

    def __init__(self, message: str | list[str], rules: list[str] | None = None, title: str = "invalid config") -> None:
        self.problems = [message] if isinstance(message, str) else list(message)
        self.rules = list(rules or [])
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{title} ({len(self.problems)} problems):\n  - " + "\n  - ".join(self.problems)
        super().__init__(text)
