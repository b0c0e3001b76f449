"""`dcpo serve`: a resident generation server (see server.py) and its start-up (run.py)."""
