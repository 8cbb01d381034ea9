"""The live dashboard: its data routes and its page in a real browser."""
