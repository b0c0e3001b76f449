"""What dcpo writes and reads: Parquet contracts, the checkpoint directory (and a LoRA
checkpoint's adapter directory), the SAS state file, model sources, the run directory's
layout. Building the policy a checkpoint holds is `dcpo_cli.policy`."""
