"""Tests run functions on N gloo ranks with `run_distributed` (see launch/spawn.py)."""

from launch.spawn import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
