"""tirl: tool-integrated reinforcement learning (ToRL / ReTool), token-in-token-out.

The package follows the data flow: data -> prompt -> rollout (engine + tool protocol + sandbox)
-> reward -> advantage -> loss -> update -> eval. ``tirl.types`` holds what crosses stages.
"""

__version__ = "0.1.0"
