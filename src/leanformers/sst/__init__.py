"""SST: Sparse Spectral Training as a PEFT tuner."""
