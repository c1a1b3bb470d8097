"""r3: Reflect, Retry, Reward — GRPO training of self-reflection in pure PyTorch."""

__version__ = "0.1.0"
