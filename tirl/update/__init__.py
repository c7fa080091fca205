"""Update: recompute log-probs with the trained model, apply the loss, step the optimizer."""

from tirl.update.logprobs import token_logprobs
from tirl.update.step import MicroBatch, make_micro_batches, policy_update

__all__ = ["MicroBatch", "make_micro_batches", "policy_update", "token_logprobs"]
