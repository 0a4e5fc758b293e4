"""Triton kernels: one file per kernel (forward_sweep.py, backward_sweep.py, ...), the shipped block
sizes (configs.py) and the helpers they share (tiles.py); launchers live in
rlsc_kernels/backends/triton_sweeps.py; aot.py compiles them for sm_90 without a GPU."""
