"""vlhub: get Qwen-VL family checkpoints running on Paddle Inference, Sophgo TPUs and VastAI VACC.

The library imports neither paddle nor torch; only the commands that need them do.
"""

from __future__ import annotations

__version__ = "0.1.0"
