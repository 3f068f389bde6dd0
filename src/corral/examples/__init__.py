"""Example kernels that ship with corral (used by ``corral demo``)."""
