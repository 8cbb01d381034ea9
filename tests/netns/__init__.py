"""Workflows and the agent on real network-namespace nodes: algorithms end to end, links, lifecycle, readiness, cgroups, zygote."""
