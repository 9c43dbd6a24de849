"""Fixtures shared by the test modules."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The memory predictor's disk store stays off in the tests (its own tests turn it on in a temporary folder): a
# prediction answered from an earlier test's entries would hide what a test means to simulate, and the suite must
# not write into the user's cache. Set before anything runs, so subprocesses (CLI runs, Ray workers) inherit it.
os.environ["NVAE_SEARCH_MEMORY_CACHE"] = "off"

# Under pytest-xdist each worker takes its share of the cores for torch's threads (set before torch is imported, and
# inherited by the processes it starts), unless OMP_NUM_THREADS says otherwise: two workers of two OpenMP threads
# each on two cores make small ops wait for descheduled threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Recipe overrides under which one process at batch 2B and two data-parallel ranks at batch B log the same losses:
# no batch norm (res_elu cells, no SE), β = 1 from the start (no per-rank KL balancing), no LR warm-up, no dynamic
# binarisation (another per-rank random draw), a log line every step, no end-of-run evaluation.
DATA_PARALLEL_EQUIVALENCE: dict[str, object] = {
    "train.progress": False,
    "model.preset": "res_elu",
    "model.use_se": False,
    "model.loss.kl_anneal_portion": 0.0,
    "train.warmup_epochs": 0,
    "data.binarize": "none",
    "train.log_every": 1,
    "train.eval_at_end": False,
}


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_profile() -> dict[str, Any]:
    """``nvae-search profile recipes/cpu/tiny.yaml --batch 8 --steps 2 --threads 1 --json``, run once (≈17 s here)
    for the CLI's report test and the memory prediction's agreement test."""
    from typer.testing import CliRunner

    from nvae_search.cli import app

    tiny = str(REPO_ROOT / "recipes" / "cpu" / "tiny.yaml")
    args = ["profile", tiny, "--batch", "8", "--steps", "2", "--threads", "1", "--json"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """One intra-op thread for the module: on a shared 2-core machine, two OpenMP threads competing with another
    process make each small op wait for a descheduled thread, and a step can run 50× slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


StepHook = Callable[[Any, Any], None]  # (trainer, batch): runs before a training step, may raise or signal there


@pytest.fixture
def before_train_step(monkeypatch: pytest.MonkeyPatch) -> Callable[[StepHook | None], None]:
    """``install(hook)`` runs ``hook(trainer, batch)`` before every training step in this process (to raise, signal
    or allocate where a real step would); ``install(None)`` restores the plain step."""
    from nvae_search.train import Trainer

    real_step = Trainer.train_step

    def install(hook: StepHook | None) -> None:
        def step(self: Trainer, x: Any) -> Any:
            if hook is not None:
                hook(self, x)
            return real_step(self, x)

        monkeypatch.setattr(Trainer, "train_step", step)

    return install


def event_trace(batch: int, events: list[tuple[str, Any]]) -> Any:
    """A memory ``StepTrace`` of ``batch`` from events: ``(kind, bytes)`` allocates (``params``, ``activations``,
    ...), ``("free", i)`` frees the i-th allocation, ``("grad", bytes)`` a gradient, ``("reset" | "end", 0)`` marks."""
    from nvae_search import memory_trace

    trace = memory_trace.StepTrace(batch)
    allocs: list[int] = []
    for what, value in events:
        if what == "free":
            trace.free(allocs[value])
        elif what == "grad":
            trace.grad(value)
        elif what in ("reset", "end"):
            trace.mark(what)
        else:
            allocs.append(trace.alloc(value, what))
    return trace


def uses_the_session_ray(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return "ray_session" in getattr(item, "fixturenames", ()) or (
        callspec is not None and callspec.params.get("backend") == "ray"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests on the session's Ray instance run last, in their usual order: an idle local Ray takes ≈8 % of a
    core (measured here), which every test after the first Ray test would otherwise pay. Under pytest-xdist each
    worker starts its own Ray for the Ray tests it is sent (xdist's ``loadgroup`` could keep them on one worker,
    but it does not group with pytest 9.2: it renames ``item._nodeid``, which pytest no longer reads)."""
    items.sort(key=uses_the_session_ray)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole session (``ray.init`` costs ≈5–10 s here, plus ≈2 s of imports); a
    search started while it runs reuses it instead of starting and stopping its own."""
    pytest.importorskip("ray.tune")
    import ray

    from nvae_search.search.ray_backend import _export_package_path

    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a local test instance: no token, no warning
    _export_package_path()  # the workers import nvae_search from this checkout
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous


def trials_by_learning_rate(
    space: Any, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Path, dict]:
    """Run ``space`` on ``backend`` (Ray through the ``ray_session`` fixture) and return its study directory and its
    trials by their ``train.learning_rate`` (the outcome, instability and seed-objective tests of both backends)."""
    from nvae_search.search.runner import run_optuna_search
    from nvae_search.search.trial import load_study

    if backend == "ray":
        request.getfixturevalue("ray_session")
        from nvae_search.search.ray_backend import run_ray_search

        study_dir = run_ray_search(space, root=tmp_path / "runs")
    else:
        study_dir = run_optuna_search(space, root=tmp_path / "runs")
    study, _, _ = load_study(study_dir)
    return study_dir, {t.params["train.learning_rate"]: t for t in study.trials}
