"""The documented import path of chat sessions: `from gptoss_mlx.chat import ChatSession`.

The code lives in gptoss_mlx/engine/chat.py; this module only keeps the README's path working.
"""

from .engine.chat import ChatSession, TurnEvent, TurnResult

__all__ = ["ChatSession", "TurnEvent", "TurnResult"]
