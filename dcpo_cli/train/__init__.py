"""dcpo train-step: one policy update from scored files (step.py orchestrates)."""
