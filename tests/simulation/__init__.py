"""The deterministic simulation of the shell (issue 12): see `run.py` and docs/ARCHITECTURE.md."""
