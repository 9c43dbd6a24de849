"""The rooms of the trainer; :mod:`nvae_search.train` holds the loop and the entry point ``train``.

- :mod:`.control`: how the ranks of a run agree (collectives) and how a signal stops the run cleanly;
- :mod:`.budget`: the run's length in steps and the learning-rate schedule that follows it;
- :mod:`.step`: one optimizer step (loss, mixed precision, non-finite policy, clipping, EMA);
- :mod:`.state`: checkpoints and resuming;
- :mod:`.ema`: batch-norm statistics for the EMA copy of the weights;
- :mod:`.logs`: metrics.jsonl, TensorBoard, the progress bar and the summary's provenance.
"""
