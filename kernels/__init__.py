"""Triton kernels and their launchers, installed as ``fastdistill.kernels``."""
