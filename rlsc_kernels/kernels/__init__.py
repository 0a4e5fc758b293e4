"""Triton kernels: one file per kernel (forward_sweep.py, backward_sweep.py); launchers live in
rlsc_kernels/backends/triton_sweeps.py; aot.py compiles them for sm_90 without a GPU."""
