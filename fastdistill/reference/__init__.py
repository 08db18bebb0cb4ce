"""Pure-PyTorch implementations: the CPU path of every op and the basis of its tests."""
