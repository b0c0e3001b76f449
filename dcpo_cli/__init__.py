"""dcpo: DCPO reinforcement learning from verifiable rewards, one Parquet stage at a time."""

__version__ = "0.1.0"
