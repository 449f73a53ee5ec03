"""The model families, one folder each: `keymap.toml` (every official tensor, its shape and the layouts it is
stored in), `family.toml` (what each deployment target needs to know of it), and its code: `inputs.py` (the smoke
input), `reference.py` (the numpy forward), `paddle.py` (the Paddle network). `vlhub.family_registry` finds the
folders; no module lists them. Families never import each other: what two share lives below them (`vlhub.smoke`)."""
