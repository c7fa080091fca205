"""Evaluation helpers. ``rollout_metrics``: the statistics the papers analyse, from trajectories."""

from tirl.eval.metrics import rollout_metrics

__all__ = ["rollout_metrics"]
