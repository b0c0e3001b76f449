"""`dcpo report`: a run's curves and tables (runs.py), a study's per algorithm over seeds
(study.py), both drawn by the same plotting code (plots.py)."""
