"""Entry point of the torchrun test's ranks: the real CLI (``python -m nvae_search``), with every latent sampled
at its mean so that a 2 × 4 run and a 1 × 8 run must follow the same trajectory (see tests/test_distributed.py)."""

from nvae_search.cli import main
from nvae_search.model.distributions import LatentNormal

if __name__ == "__main__":
    LatentNormal.sample = lambda self: self.mu  # type: ignore[method-assign]
    main()
