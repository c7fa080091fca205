"""Rollout: an engine samples, the tool protocol decides when to run code, the sandbox runs it."""

from tirl.rollout.engine import AsyncEngine, BatchingAsyncEngine, Engine, Generation, SamplingParams, StopCondition
from tirl.rollout.tir import RolloutLimits, RolloutTimes, resolve_mode, rollout, rollout_async

__all__ = ["AsyncEngine", "BatchingAsyncEngine", "Engine", "Generation", "RolloutLimits", "RolloutTimes", "SamplingParams",
           "StopCondition", "resolve_mode", "rollout", "rollout_async"]
