"""Training across processes on torch.distributed, applied from outside the model (see ``parallelize``)."""
