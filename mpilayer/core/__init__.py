"""Numbers only: components, quantisation, bounds, estimates, tiling, coding, terms and their cost.

Imports neither mpi4py nor h5py (tests/test_layout.py checks it)."""
