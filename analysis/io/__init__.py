"""Reading checkpoints: files and folders of tensors, read lazily and paired by name."""
