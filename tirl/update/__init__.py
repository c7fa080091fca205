"""Update: recompute log-probs with the trained model, apply the loss, step the optimizer."""

from tirl.update.logprobs import token_logprobs
from tirl.update.step import MicroBatch, collate, policy_update, sequence_logprobs

__all__ = ["MicroBatch", "collate", "policy_update", "sequence_logprobs", "token_logprobs"]
