"""`--to paddle-inference`: weights in the names Paddle's inference loaders read, and static graphs."""

from vlhub import smoke  # noqa: F401 - importing it quiets what paddle prints on import (see vlhub.smoke)

NAME = "paddle-inference"  # the target's name: its `--to`, its cache key, its manifest's target.name
