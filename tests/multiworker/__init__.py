"""Several workers, each behind its own agent and address on this machine."""
