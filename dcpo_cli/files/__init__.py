"""What dcpo writes and reads: Parquet contracts, checkpoints, the SAS state file, model sources."""
