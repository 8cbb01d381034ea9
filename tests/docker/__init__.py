"""Docker nodes through a real agent: FL, links, lifecycle."""
