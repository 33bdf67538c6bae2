"""Shared pytest setup.

Triton kernels run in Triton's interpreter when there is no GPU. The switch has to be set
before triton is imported anywhere, so it lives here, ahead of every test module.
"""
import os
import torch

if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PLOTLY_RENDERER", "json")   # no browser in tests
