"""Parallelism applied from outside: the sharded head pool protocol (and, later, DeepSpeed for G).

The pure parts (the owner map) import nothing distributed; the protocol uses torch.distributed
collectives on whatever process group the caller set up (gloo on CPU, NCCL on GPU).
"""
