"""On-disk LoRA formats. Each module: matches(keys, metadata), read(tensors, metadata) -> AdapterWeights, write(...)."""
