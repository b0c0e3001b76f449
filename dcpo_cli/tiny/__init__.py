"""The built-in tiny model and arithmetic task (dcpo tiny init)."""
