"""Standalone tools that build and check flashdmd shards (DESIGN.md, "tools"); each file runs as a script."""
