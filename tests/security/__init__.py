"""Who may call what, floods, fuzzing, hardening, the node's box and privileges, bounded and bad input."""
