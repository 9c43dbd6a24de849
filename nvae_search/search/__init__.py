"""Architecture search: compiling space files for Optuna (in-process) and Ray Tune (later)."""
