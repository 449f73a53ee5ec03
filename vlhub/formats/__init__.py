"""Checkpoint files, read and written tensor by tensor: safetensors, Paddle pdparams (a pickle), torch .bin (a zip
of pickles), their indexes, and the dtypes they store. Nothing here knows a model family."""
