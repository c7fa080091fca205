"""Rollout: an engine samples, the tool protocol decides when to run code, the sandbox runs it."""

from tirl.rollout.engine import Engine, Generation, SamplingParams, StopCondition
from tirl.rollout.tir import RolloutLimits, RolloutTimes, rollout

__all__ = ["Engine", "Generation", "RolloutLimits", "RolloutTimes", "SamplingParams", "StopCondition", "rollout"]
