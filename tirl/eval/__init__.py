"""Evaluation helpers. ``rollout_metrics``: the statistics the papers analyse, from trajectories."""

from tirl.eval.metrics import per_source_metrics, rollout_metrics

__all__ = ["per_source_metrics", "rollout_metrics"]
