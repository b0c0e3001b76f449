"""The file-to-file stages: prepare, rollout, score, report, inspect."""
