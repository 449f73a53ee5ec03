"""`--to paddle-inference`: weights in the names Paddle's inference loaders read, and static graphs."""

from vlhub import smoke  # noqa: F401 - importing it quiets what paddle prints on import (see vlhub.smoke)
