"""Benches of the testbed, each run as `python3 bench/<bench>.py`."""
