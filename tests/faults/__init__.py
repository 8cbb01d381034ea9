"""Faults: node kill, pause, restart, link changes, scenarios and each algorithm's tolerance of them."""
