"""Rewards: a registry of scorers with one signature, combined by weight (docs/design.md §5).

Model-free sanity rewards (:mod:`.simple`), OmniReward (:mod:`.omni`: ``omni_classic``, ``omni_vlm``)
and AI-Portrait (:mod:`.ai_portrait`: ``ai_portrait_classic``, ``ai_portrait_vlm``,
``ai_portrait_detector``). Heavy dependencies (transformers models, BRISQUE, calibration sets) load
only when a reward that needs them is built.
"""
from . import ai_portrait, omni, remote, simple  # noqa: F401  (register the rewards and the reward server)
from .registry import (PartsReward, Reward, RewardError, RewardSet, Normalization, available_rewards, build_reward,
                       register_reward)

__all__ = ["Normalization", "PartsReward", "Reward", "RewardError", "RewardSet", "available_rewards", "build_reward",
           "register_reward"]
