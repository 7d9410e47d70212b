"""Facts about the host, its GPUs and a model file, read without any ML framework."""
