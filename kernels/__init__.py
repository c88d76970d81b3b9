"""Attention kernels. They take tensors (and, later, block tables) and know nothing of
sequences or scheduling. `reference.py` holds the plain-torch maths every kernel must match."""
