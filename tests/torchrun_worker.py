"""Entry point of the torchrun test's ranks: the real CLI (``python -m nvae_search``), with every latent sampled
at its mean so that a 2 × 4 run and a 1 × 8 run must follow the same trajectory (see tests/test_distributed.py).

With NVAE_TEST_SIGTERM_AFTER_STEP=k, rank 0 sends itself SIGTERM right after step k, as a cluster scheduler's
preemption would: every rank must stop at the same step and leave a checkpoint to resume from.
"""

import os
import signal
from typing import Any

from nvae_search.cli import main
from nvae_search.model.distributions import LatentNormal


def _sigterm_after(step: int) -> None:
    from nvae_search.train import Trainer

    original = Trainer.train_step

    def train_step(self: Trainer, x: Any) -> Any:
        out = original(self, x)
        if self.rank == 0 and self.step + 1 == step:  # the loop counts the step right after this returns
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    Trainer.train_step = train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    LatentNormal.sample = lambda self: self.mu  # type: ignore[method-assign]
    if os.environ.get("NVAE_TEST_SIGTERM_AFTER_STEP"):
        _sigterm_after(int(os.environ["NVAE_TEST_SIGTERM_AFTER_STEP"]))
    main()
