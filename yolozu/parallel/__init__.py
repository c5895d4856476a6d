"""Scale-out under torchrun: the process group (world), the shard plan and the collectives that keep ranks one model."""
