"""`--to paddle`, `--to safetensors`, `--to torch`: the converted checkpoint itself, in the key layout and format
each framework's loaders read."""
