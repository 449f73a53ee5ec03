"""The conversion engine: a key map and a checkpoint's headers give a plan (renames, transposes, casts), and a
pipeline runs it tensor by tensor into a writer, staged and swapped into place."""
