"""Engines: how the trainable and frozen networks are placed, sharded, stepped and saved."""
