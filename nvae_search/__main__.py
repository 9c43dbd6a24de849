"""``python -m nvae_search`` runs the command line (also as each rank of ``torchrun … -m nvae_search train``)."""

from nvae_search.cli import main

# Guarded: spawned worker processes (profile) re-import the main module under another name.
if __name__ == "__main__":
    main()
