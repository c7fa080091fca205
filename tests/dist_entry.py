"""`tirl` as the distributed tests launch it (under torchrun, or alone): the real CLI, plus the
test's deterministic stand-in rewards (the parity of the first sampled token, or of the sum of all) and, when ``TIRL_TEST_FAIL=RANK:STEP`` is set, a simulated
crash of that rank while it scores that step (only in torchrun's first attempt, so that a job run
with ``--max-restarts`` comes back and resumes)."""

import os
import sys

from tirl.cli import main
from tirl.reward import register_term

register_term("first_token_parity")(lambda traj, cfg: 1.0 if traj.token_ids[traj.prompt_len] % 2 else -1.0)
# the parity of the sum of every sampled id: varies within a group even once the first token is settled
register_term("token_sum_parity")(lambda traj, cfg: 1.0 if sum(traj.token_ids[traj.prompt_len:]) % 2 else -1.0)

if os.environ.get("TIRL_TEST_FAIL") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import tirl.train as T

    rank, step = map(int, os.environ["TIRL_TEST_FAIL"].split(":"))
    real_score, real_step, current = T.score, T.Trainer.step, [0]

    def score(trajs, cfg, verifier):  # after this step's rollout, before its update
        if int(os.environ.get("RANK", "0")) == rank and current[0] == step:
            raise RuntimeError(f"simulated crash of rank {rank} at step {step}")
        return real_score(trajs, cfg, verifier)

    def trainer_step(self):
        current[0] = self.done.step + 1
        return real_step(self)

    T.score, T.Trainer.step = score, trainer_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
