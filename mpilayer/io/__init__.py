"""HDF5 in and out: input readers, result files (written and published atomically), run safety."""
