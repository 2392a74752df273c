"""Training across processes on torch.distributed (launched by torchrun), applied from outside the model:
``world`` (ranks, mesh, the recipe's ``parallel``), ``parallelize`` (expert parallelism, recompute, FSDP2),
``expert_parallel``, ``muon`` (Newton-Schulz on sharded matrices), ``checkpoint`` (DCP training checkpoints),
``load`` (official checkpoints read shard by shard), ``gather`` (the whole model for the official format), ``plan``
(per-rank memory), ``recompute`` (activation checkpointing, also in one process). See docs/distributed.md."""
