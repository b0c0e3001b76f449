"""torchrun and FSDP2: process groups, sharding, the --nproc-per-node re-launch."""
