"""Smoke tests: a numpy reference forward, Paddle forwards and static graphs, and the verdict.

Importing this package imports neither paddle nor torch. It only quiets what paddle prints on import, for
the modules here that import it: the absent-ccache warning (a tool for building C++ extensions) and its
C++ log's informational notes (errors still show).
"""

import os
import warnings

os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found")
