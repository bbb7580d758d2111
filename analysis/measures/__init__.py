"""Per-tensor measures: pure functions of weight tensors (norms, spectra, ranks), no files and no models."""
