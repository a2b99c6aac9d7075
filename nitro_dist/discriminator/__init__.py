"""Discriminator: frozen UNet-encoder backbone taps, small heads, and the dynamic head pool.

Pure torch: nothing here imports ray, deepspeed or torch.distributed.
"""
