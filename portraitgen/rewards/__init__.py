"""Rewards: a registry of scorers with one signature, combined by weight (design.md §5)."""
from . import simple  # noqa: F401  (registers the model-free rewards)
from .registry import Reward, RewardError, RewardSet, available_rewards, build_reward, register_reward

__all__ = ["Reward", "RewardError", "RewardSet", "available_rewards", "build_reward", "register_reward"]
