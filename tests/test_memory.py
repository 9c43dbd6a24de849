"""Training-step memory predicted on fake tensors: close to real tensor memory, monotone where it must be."""

from __future__ import annotations

import gc
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import event_trace
from typer.testing import CliRunner, Result

from nvae_search import memory, memory_cache, memory_step, memory_trace
from nvae_search.cli import app
from nvae_search.profile import STEP_MEMORY, _measure_steps
from nvae_search.schema import load_recipe
from nvae_search.search.constraints import OverMemory

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
FIELDS = (
    "device",
    "batch",
    "precision",
    "checkpointing",
    "peak_bytes",
    "params_bytes",
    "grads_bytes",
    "optimizer_bytes",
    "activations_bytes",
)


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_predictor() -> memory.MemoryPredictor:
    return memory.MemoryPredictor(load_recipe(TINY), device="cuda")


def step_peak_bytes(parts: memory_step.StepParts, block_bytes: int = 1, device: str = "cpu") -> int:
    """Peak live tensor bytes of one whole training step (optimizer included), counted by the dispatch tracker from
    a start where parameters, buffers, Adamax state (in ``device``'s memory) and the batch are live."""
    memory_step.init_optimizer_state(parts.optimizer)
    tracker = memory.StorageTracker(block_bytes=block_bytes)
    for t in (*parts.model.parameters(), *parts.model.buffers(), *parts.spectral.buffers(), parts.x):
        tracker.track(t)
    for t in memory_step.state_tensors(parts.optimizer, device):
        tracker.track(t)
    tracker.reset_peak()
    with tracker:
        memory_step.training_step(parts)
    return tracker.peak


def measured_peak_bytes(batch: int) -> int:
    """The same training step on real CPU tensors, its live tensor bytes counted by the same dispatch tracker."""
    torch.manual_seed(0)
    return step_peak_bytes(memory_step.build_step_parts(load_recipe(TINY), batch, "fp32", False, foreach=False))


def test_tracker_counts_live_storages_once_and_keeps_the_peak() -> None:
    tracker = memory.StorageTracker()
    with tracker:
        a = torch.ones(1000)  # 4,000 bytes
        view = a[10:]  # a view: no new storage
        b = torch.ones(500, dtype=torch.float16)  # 1,000 bytes
        assert tracker.current == 5000 and view.numel() == 990
        del a, view
        c = torch.ones(250)  # 1,000 bytes, after 4,000 were released
        assert tracker.current == 2000 and tracker.peak == 5000
    del b, c
    assert tracker.current == 0 and tracker.peak == 5000
    blocks = memory.StorageTracker(block_bytes=512)
    with blocks:
        d = torch.ones(1)  # CUDA's caching allocator would hand out 512 bytes for 4
    assert blocks.peak == 512 and d.numel() == 1


def test_prediction_within_15_percent_of_real_tensor_memory_on_cpu() -> None:
    predicted = memory.predict_step_memory(load_recipe(TINY), batch=8, precision="fp32", device="cpu")
    measured = measured_peak_bytes(8)
    assert predicted.device == "cpu" and predicted.batch == 8
    assert abs(predicted.peak_bytes - measured) <= 0.15 * measured, (predicted.peak_bytes, measured)


def test_fake_reads_answer_as_a_steady_step_after_the_first() -> None:
    """Data-dependent init flags read False (done), counters 1 (past the first call): the figures are a later step's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nvae_search.model.ops import Conv2D

    with FakeTensorMode(), memory.StorageTracker():
        conv = Conv2D(2, 2, 3, padding=1, data_init=True)
        # The conv's forward asks this flag: True would rerun the init (and its temporaries) in every step.
        assert bool(conv.needs_data_init) is False and int(torch.zeros((), dtype=torch.long)) == 1


def test_profile_measures_the_step_the_prediction_predicts_and_they_agree(tiny_profile: dict[str, Any]) -> None:
    """`profile` (real tensors, torch's CPU allocator) and the prediction (fake tensors) describe one full step."""
    report = tiny_profile  # the tiny recipe at --batch 8
    assert report["memory_what"] == f"{STEP_MEMORY}, fp32" and "optimizer step" in STEP_MEMORY
    for key in ("checkpointing_off", "checkpointing_on"):
        measured = report[key]["memory"]
        assert measured["source"].startswith("torch CPU allocator")
        # The step starts with parameters, buffers, Adamax state and the batch alive: 28k parameters, 3 copies.
        assert measured["start_bytes"] > 3 * 4 * 27_998
        assert 0.75 <= measured["predicted_over_measured"] <= 1.25, measured
    assert report["checkpointing_on"]["memory"]["peak_bytes"] < report["checkpointing_off"]["memory"]["peak_bytes"]


def test_prediction_agrees_with_the_allocator_measurement_on_the_cpu_mnist_recipe() -> None:
    recipe = load_recipe(ROOT / "recipes" / "cpu" / "mnist.yaml")
    job = {"recipe": recipe.model_dump(mode="json"), "batch": 4, "steps": 1, "threads": None, "device": "cpu"}
    measured = _measure_steps({**job, "precision": "fp32", "checkpointing": False})["memory"]["peak_bytes"]
    predicted = memory.predict_step_memory(recipe, batch=4, precision="fp32", checkpointing="off", device="cpu")
    assert abs(predicted.peak_bytes - measured) <= 0.25 * measured, (predicted.peak_bytes, measured)


def test_prediction_is_monotone_and_adds_up(tiny_predictor: memory.MemoryPredictor) -> None:
    base = tiny_predictor.predict(8, "fp32", "off")
    parts = (base.params_bytes, base.grads_bytes, base.optimizer_bytes, base.activations_bytes)
    assert sum(parts) == base.peak_bytes and min(parts) >= 0
    params = sum(p.numel() * p.element_size() for p in tiny_predictor.parts.model.parameters())
    assert params <= base.params_bytes < 1.5 * params + 512 * 1000  # parameters + buffers, 512-byte CUDA blocks
    assert base.optimizer_bytes >= 2 * params  # Adamax: exp_avg and exp_inf
    assert tiny_predictor.predict(16, "fp32", "off").peak_bytes > base.peak_bytes
    assert tiny_predictor.predict(8, "fp32", "cell").peak_bytes < base.peak_bytes
    assert tiny_predictor.predict(8, "fp16", "off").activations_bytes < 0.8 * base.activations_bytes
    assert tiny_predictor.predict(8, "bf16", "off").activations_bytes < 0.8 * base.activations_bytes
    assert memory.resolve_precision("auto", "cuda") == "fp16" and memory.resolve_precision("auto", "cpu") == "fp32"


def test_views_made_without_the_fake_mode_are_the_fake_modes_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view the shape cache makes on a meta kernel (the fake mode's own rules for ``view``, ``select``,
    ``squeeze`` and ``slice`` included, which differ from it only for sizes unknown until run time) has the sizes,
    strides, offset and storage the fake mode gives it."""
    made: dict[str, int] = {}
    shortcut = memory.FakeShapeCache.view

    def checked(self: memory.FakeShapeCache, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        out = shortcut(self, func, args, kwargs)
        if out is not None:
            own = func(*args, **kwargs)  # inside the tracker's dispatch: through the fake mode
            assert (out.shape, out.stride(), out.storage_offset(), out.dtype, out.fake_device) == (
                own.shape,
                own.stride(),
                own.storage_offset(),
                own.dtype,
                own.fake_device,
            ), func
            assert out.untyped_storage()._cdata == args[0].untyped_storage()._cdata, func
            made[str(func)] = made.get(str(func), 0) + 1
        return out

    monkeypatch.setattr(memory.FakeShapeCache, "view", checked)
    predictor = memory.MemoryPredictor(load_recipe(TINY), device="cuda", replay=False, cache=False)
    for setting in [(3, "fp32", "off"), (2, "fp16", "cell")]:
        predictor.predict(*setting)
    static = {"aten.view.default", "aten.select.int", "aten.squeeze.dim", "aten.slice.Tensor"}
    assert static <= set(made), made


def test_the_shape_cache_speeds_up_without_changing_any_figure() -> None:
    """Ops seen before are replayed from the memo, new ones and views run on bare meta kernels where the fake mode
    itself would: every figure as with every op through the fake mode."""
    predictor = memory.MemoryPredictor(load_recipe(TINY), device="cuda", replay=False)
    settings = [(8, "fp32", "off"), (8, "fp16", "cell"), (3, "fp16", "off")]
    cache = predictor.shapes
    assert cache is not None
    hits, computed, viewed = cache.hits, cache.computed, cache.viewed
    cached = [predictor.predict(*s) for s in settings]
    # every shortcut used (not a memo that never answers): replayed, computed on meta, views made without the mode
    assert cache.hits > hits and cache.computed > computed and cache.viewed > viewed
    try:
        predictor.shapes = None  # every op through the fake mode
        plain = [predictor.predict(*s) for s in settings]
    finally:
        predictor.shapes = cache
    assert cached == plain


@pytest.mark.parametrize("weight_decay", [0.0, 3e-4])
def test_the_optimizer_phase_on_meta_tensors_is_memoised_without_changing_its_bytes(
    weight_decay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimizer phase runs on plain meta tensors: element ops are replayed from the memo and each multi-tensor
    op runs once per distinct parameter shape, with the same bytes as every op run by its meta kernel. Weight decay
    adds a multi-tensor op with a keyword (``_foreach_add(grads, params, alpha=wd)``), memoised alike."""
    predictor = memory.MemoryPredictor(load_recipe(TINY), device="cuda")
    parts = predictor.parts
    shapes = [p.shape for p in parts.model.parameters()]
    assert len(set(shapes)) < len(shapes)  # repeated shapes, or the test proves nothing

    def extra_bytes(cache: memory.ShapeCache | None) -> int:
        params = [torch.empty(s, device="meta") for s in shapes]
        defaults = {**parts.optimizer.defaults, "weight_decay": weight_decay}
        optimizer = memory_step.zero_adamax_state(torch.optim.Adamax(params, **defaults))
        return memory_step.optimizer_phase_bytes(params, lambda _: optimizer, cache, predictor.block_bytes)

    answered: dict[str, bool] = {}
    memoised_foreach = memory.MetaShapeCache.foreach

    def spy(self: memory.MetaShapeCache, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
        handled, out = memoised_foreach(self, func, args, kwargs)
        if func._schema.name.startswith("aten::_foreach_") and args[0][0].is_meta:  # not the CPU step counters
            answered[str(func)] = handled
        return handled, out

    reference = extra_bytes(None)
    monkeypatch.setattr(memory.MetaShapeCache, "foreach", spy)
    assert extra_bytes(memory.MetaShapeCache()) == reference > 0
    assert len(answered) >= 5 and all(answered.values()), answered
    assert ("aten._foreach_add.List" in answered) == (weight_decay > 0)


def whole_step_peak_bytes(recipe_path: Path, batch: int, precision: str, checkpointing: str) -> int:
    """Peak of the whole training step simulated op by op on fake tensors, optimizer included, with CUDA's blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recipe = load_recipe(recipe_path)
    # The outer tracker answers the fake tensors' data-dependent reads, as in the predictor.
    with FakeTensorMode(), memory.StorageTracker():
        parts = memory_step.build_step_parts(recipe, batch, precision, checkpointing == "cell", foreach=True)  # type: ignore[arg-type]
        return step_peak_bytes(parts, block_bytes=512, device="cuda")


@pytest.mark.parametrize(
    ("recipe", "batch", "precision", "checkpointing"),
    [("cpu/tiny", 1, "fp32", "cell"), ("cpu/tiny", 8, "fp16", "off"), ("cpu/mnist_searched", 2, "fp32", "cell")],
)
def test_the_optimizer_phase_measured_once_gives_the_whole_steps_peak(
    recipe: str, batch: int, precision: str, checkpointing: str
) -> None:
    """The gradient norm and Adamax are simulated once per predictor and added after the backward pass: the same
    peak as the whole step simulated op by op (at small batches with checkpointing the optimizer phase is the peak)."""
    path = ROOT / "recipes" / f"{recipe}.yaml"
    predicted = memory.MemoryPredictor(load_recipe(path), device="cuda", replay=False).predict(
        batch, precision, checkpointing
    )
    assert predicted.peak_bytes == whole_step_peak_bytes(path, batch, precision, checkpointing)


@pytest.mark.parametrize("recipe", ["cpu/tiny", "cpu/mnist_searched"])
def test_replayed_steps_equal_simulated_ones(recipe: str) -> None:
    """After two simulated batch sizes a setting's step is replayed from its storage events at any other batch:
    every figure equal to a simulation, for each precision and checkpointing."""
    recipe_ = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    fast, slow = memory.MemoryPredictor(recipe_, "cuda"), memory.MemoryPredictor(recipe_, "cuda", replay=False)
    for precision, checkpointing in [("fp32", "off"), ("fp16", "cell")]:
        fast.predict(3, precision, checkpointing), fast.predict(5, precision, checkpointing)
        assert fast.can_replay(precision, checkpointing)
        simulations = fast.simulations
        for batch in (2, 16):  # below and above the two simulated batches
            assert fast.predict(batch, precision, checkpointing) == slow.predict(batch, precision, checkpointing)
        assert fast.simulations == simulations and fast.replays >= 2
    assert not slow.can_replay("fp32", "off")


@pytest.fixture
def memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The predictor's disk store on, in a temporary folder (the suite keeps it off: tests/conftest.py)."""
    root = tmp_path / "memory-store"
    monkeypatch.setenv(memory_cache.CACHE_ENV, str(root))
    return root


STORE_SETTINGS = [(4, "fp32", "off"), (9, "fp32", "off"), (2, "fp16", "cell"), (5, "fp16", "cell"), (1, "fp16", "cell")]


def test_a_network_predicted_once_is_answered_from_the_disk_store(memory_store: Path) -> None:
    """A second predictor (a later ``validate``, another trial of the architecture) answers every batch from the
    store without building the network or simulating a step: the same figures as without any store."""
    recipe = load_recipe(TINY)
    first = memory.MemoryPredictor(recipe, "cuda")
    expected = [first.predict(*s) for s in STORE_SETTINGS]
    assert first.simulations == 5 and first.can_replay("fp32", "off")  # 4 and 9 traced: a fit, then replays
    assert expected == [memory.MemoryPredictor(recipe, "cuda", cache=False).predict(*s) for s in STORE_SETTINGS]
    second = memory.MemoryPredictor(recipe, "cuda")
    said: list[str] = []
    second.progress = said.append
    assert [second.predict(*s) for s in STORE_SETTINGS] == expected
    assert [second.predict(b, p, c) for b, p, c in [(13, "fp32", "off"), (7, "fp16", "cell")]] == [
        first.predict(b, p, c) for b, p, c in [(13, "fp32", "off"), (7, "fp16", "cell")]
    ]
    assert second.simulations == 0 and second._parts is None and said == []  # nothing built, nothing simulated
    # one trace of a setting in the store and one made now give the fit: a process that simulates batch 6 replays
    third = memory.MemoryPredictor(recipe, "cuda")
    third.predict(6, "bf16", "off")
    assert not third.can_replay("bf16", "off")
    fourth = memory.MemoryPredictor(recipe, "cuda")
    fourth.predict(3, "bf16", "off")
    assert fourth.can_replay("bf16", "off") and fourth.simulations == 1
    assert fourth.predict(11, "bf16", "off") == memory.MemoryPredictor(recipe, "cuda", replay=False).predict(
        11, "bf16", "off"
    )


def test_the_store_keeps_apart_what_changes_the_figures(memory_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another network, weight decay (the optimizer phase) and another version of the code each miss the store;
    damaged entries are ignored and a store that cannot be written costs nothing but the speed-up."""
    recipe = load_recipe(TINY)
    memory.MemoryPredictor(recipe, "cuda").predict(4, "fp32", "off")
    wider = load_recipe(TINY, overrides={"model.num_channels_enc": 8, "model.num_channels_dec": 8})
    other = memory.MemoryPredictor(wider, "cuda")
    wider_reference = memory.MemoryPredictor(wider, "cuda", cache=False)
    assert other.predict(4, "fp32", "off") == wider_reference.predict(4, "fp32", "off") and other.simulations == 1
    undecayed = load_recipe(TINY, overrides={"train.weight_decay": 0.0})  # the recipe's Adamax decays: 3e-4
    without_decay = memory.MemoryPredictor(undecayed, "cuda")
    reference = memory.MemoryPredictor(undecayed, "cuda", cache=False)
    assert without_decay.predict(4, "fp32", "off") == reference.predict(4, "fp32", "off")
    assert without_decay.simulations == 0 and without_decay._parts is not None  # trace reused, optimizer measured
    assert without_decay.store is not None
    assert sorted(p.name for p in without_decay.store.folder.glob("optimizer-*")) == [
        "optimizer-wd0.json",
        "optimizer-wd1.json",
    ]

    for path in memory_store.rglob("*.npz"):
        path.write_bytes(path.read_bytes()[:100])  # torn entries
    torn = memory.MemoryPredictor(recipe, "cuda")
    assert torn.predict(4, "fp32", "off") == reference_tiny(4) and torn.simulations == 1

    monkeypatch.setattr(memory_cache, "code_digest", lambda: "another version of the code")
    changed = memory.MemoryPredictor(recipe, "cuda")
    assert changed.predict(4, "fp32", "off") == reference_tiny(4) and changed.simulations == 1

    blocked = memory_store.parent / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(memory_cache.CACHE_ENV, str(blocked / "store"))
    unwritable = memory.MemoryPredictor(recipe, "cuda")
    assert unwritable.predict(4, "fp32", "off") == reference_tiny(4) and unwritable.simulations == 1
    monkeypatch.setenv(memory_cache.CACHE_ENV, "off")
    assert memory.MemoryPredictor(recipe, "cuda").store is None
    monkeypatch.delenv(memory_cache.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))  # a container without a home: no store, no error
    assert memory_cache.cache_root() is None and memory.MemoryPredictor(recipe, "cuda").store is None


def test_the_store_makes_room_by_removing_the_networks_used_longest_ago(
    memory_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over its size limit, a network new to the store removes the folders used longest ago, never its own;
    opening a network's folder counts as a use."""
    tiny = load_recipe(TINY)
    store = memory_cache.TraceStore.open(tiny, "cuda", "cpu")
    assert store is not None
    reopened, old, recent = store.folder, memory_store / "old", memory_store / "recent"
    for age, folder in enumerate((reopened, old, recent)):
        folder.mkdir(parents=True)
        (folder / "fp32-off-b4.npz").write_bytes(b"x" * 1000)
        os.utime(folder, (1000 + age, 1000 + age))  # by last use: tiny's, old, recent
    memory_cache.TraceStore.open(tiny, "cuda", "cpu")  # tiny's network used again: now the most recent
    store.folder = memory_store / "new"
    monkeypatch.setattr(memory_cache, "STORE_MAX_BYTES", 2100)  # three of the four folders: one must go
    store.save_number("optimizer-wd1", 5)
    assert sorted(p.name for p in memory_store.iterdir()) == sorted(["new", "recent", reopened.name])


def reference_tiny(batch: int) -> memory.MemoryPrediction:
    return memory.MemoryPredictor(load_recipe(TINY), "cuda", cache=False).predict(batch, "fp32", "off")


def test_a_refusal_in_the_store_is_raised_again_without_simulating(memory_store: Path) -> None:
    """Batch norm's refusal of a batch (one value per channel) is stored with its message and raised again."""
    recipe = load_recipe(TINY)
    predictor = memory.MemoryPredictor(recipe, "cuda")
    assert predictor.store is not None
    predictor.store.save_refusal(("fp32", "off"), 1, "Expected more than 1 value per channel when training")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        predictor.predict(1, "fp32", "off")
    assert predictor.simulations == 0


def test_a_trace_replays_exactly_and_refuses_what_it_cannot_replay() -> None:
    def step(batch: int, release_order: tuple[int, int] = (1, 2), params: int = 1000) -> memory_trace.StepTrace:
        return event_trace(
            batch,
            [
                *[
                    ("activations", params),
                    ("reset", 0),
                    ("activations", 10 * batch),
                    ("activations", 100 * batch + 4),
                    ("activations", 7),
                ],
                *[("free", release_order[0]), ("free", release_order[1]), ("activations", 30 * batch), ("end", 0)],
            ],
        )

    fit = memory_trace.AffineTrace.fit(step(2), step(4, release_order=(2, 1)))  # frees in a row: any order
    assert fit is not None
    peak, kinds = fit.replay(9, block_bytes=1)
    assert peak == 1000 + 90 + 904 + 7 and kinds == {"activations": peak, "grads": 0}
    assert fit.replay(9, block_bytes=512)[0] == 512 * (2 + 1 + 2 + 1)  # each storage in whole CUDA blocks
    assert fit.replay(9, block_bytes=1, after_end=2000)[0] == 1000 + 7 + 270 + 2000  # the optimizer phase's peak
    assert memory_trace.AffineTrace.fit(step(2), step(2)) is None  # one batch size gives no line
    assert memory_trace.AffineTrace.fit(step(2), step(5)) is not None

    def one_alloc(batch: int, nbytes: int) -> memory_trace.StepTrace:
        return event_trace(batch, [("activations", 1000), ("reset", 0), ("activations", nbytes), ("end", 0)])

    assert memory_trace.AffineTrace.fit(one_alloc(2, 20), one_alloc(4, 41)) is None  # 10.5 bytes per image
    assert memory_trace.AffineTrace.fit(one_alloc(2, 20), one_alloc(4, 60)) is None  # -20 bytes at batch 0
    assert memory_trace.AffineTrace.fit(one_alloc(2, 20), one_alloc(4, 40)) is not None
    assert memory_trace.AffineTrace.fit(step(2), one_alloc(4, 40)) is None  # other events: another step


@pytest.mark.parametrize("replay", [True, False])
def test_largest_batch_fits_and_one_more_does_not(replay: bool) -> None:
    predictor = memory.MemoryPredictor(load_recipe(TINY), device="cuda", replay=replay)
    base = predictor.predict(4, "fp32", "off")
    limits = {"small": 3 * base.peak_bytes, "large": 20 * base.peak_bytes}
    largest = memory.largest_batches(predictor, base, limits)
    if replay:  # the base batch and twice it simulated, every other batch replayed
        assert predictor.simulations == 2 and predictor.replays > 5
    check = memory.MemoryPredictor(load_recipe(TINY), device="cuda", replay=False)
    for name, limit in limits.items():
        assert largest[name] > 4
        assert check.predict(largest[name], "fp32", "off").peak_bytes <= limit
        assert check.predict(largest[name] + 1, "fp32", "off").peak_bytes > limit


def test_validate_json_adds_memory_and_text_says_what_fits(tiny_predictor: memory.MemoryPredictor) -> None:
    result = invoke(["validate", str(TINY), "--json", "--batch", "4", "--checkpointing", "cell"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["memory"]
    assert set(FIELDS) <= set(report)
    assert (report["device"], report["batch"], report["precision"], report["checkpointing"]) == (
        "cuda",
        4,
        "fp32",
        "cell",
    )
    assert report["fits_gb"] == {"16": True, "24": True, "40": True, "80": True}
    assert 0 < report["largest_batch"]["16"] < report["largest_batch"]["80"]
    text = "\n".join(memory.memory_lines(report))
    assert "fits on 16 / 24 / 40 / 80 GB at batch 4" in text
    assert f"peak {memory.format_bytes(report['peak_bytes'])}, at that moment params " in text
    assert f"80 GB: {report['largest_batch']['80']}" in text


@pytest.mark.parametrize("enabled", [True, False])
def test_a_prediction_leaves_the_cycle_collector_as_it_found_it(enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The predictor pauses Python's cycle collector while it builds and simulates (a full collection over its memo
    costs a sixth of a step); the caller's process gets it back as it was, also when the recipe refuses the batch."""

    def refuse(parts: Any) -> None:
        raise ValueError("Expected more than 1 value per channel when training")

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        predictor = memory.MemoryPredictor(load_recipe(TINY), cache=False, replay=False)
        assert gc.isenabled() is enabled
        predictor.predict(2, "fp32", "off")
        assert gc.isenabled() is enabled
        monkeypatch.setattr(memory, "forward_backward", refuse)
        with pytest.raises(ValueError, match="1 value per channel"):
            predictor.predict(4, "fp32", "off")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_the_memory_report_says_which_part_it_is_running() -> None:
    """``validate --memory`` takes tens of seconds on the largest recipes: its spinner is told each part."""
    said: list[str] = []
    report = memory.memory_report(load_recipe(TINY), batch=4, progress=said.append)
    assert said[0] == "building the network"
    simulated = [s for s in said[1:] if s.startswith("simulating a training step at batch ")]
    assert simulated == said[1:] and len(simulated) >= 2  # the batch, twice the batch (replays say nothing)
    assert simulated[0].startswith("simulating a training step at batch 4 (")
    assert simulated[1].startswith("simulating a training step at batch 8 (")
    assert report["batch"] == 4 and "largest_batch" in report


def test_validate_without_memory_options_predicts_nothing() -> None:
    result = invoke(["validate", str(TINY), "--json"])
    assert result.exit_code == 0 and "memory" not in json.loads(result.output)


@pytest.mark.parametrize("bad", [["--precision", "fp8"], ["--checkpointing", "all"]])
def test_validate_rejects_bad_memory_options(bad: list[str]) -> None:
    result = invoke(["validate", str(TINY), *bad])
    assert result.exit_code == 2
    assert bad[0] in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------- search constraint
def write_space(tmp_path: Path, limit_gib: float) -> Path:
    """A tiny space whose 'wide' branch (32 channels) needs several times the memory of its 'narrow' one."""
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": "memory", "n_trials": 2, "seed": 0},
        "budget": {"steps": 4, "eval_iw_samples": 2, "eval_images": 16, "report_every_steps": 2},
        "sampler": {"type": "grid"},
        "pruner": {"type": "none"},
        "constraints": {"gpu_memory_gib": limit_gib},
        "space": {"model.num_channels_enc": {"type": "categorical", "choices": [4, 32]}},
    }
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_trial_predicted_over_the_space_memory_limit_is_pruned_untrained_and_reported(tmp_path: Path) -> None:
    import optuna
    from rich.console import Console

    from nvae_search.search.report import build_report
    from nvae_search.search.runner import load_study, run_optuna_search
    from nvae_search.spaces import load_space

    limit = 0.05  # GiB: the tiny recipe at batch 8 needs ~0.02, with 32 encoder channels ~0.1
    study_dir = run_optuna_search(load_space(write_space(tmp_path, limit)), root=tmp_path / "runs")
    study = load_study(study_dir)[0]
    by_width = {t.params["model.num_channels_enc"]: t for t in study.trials}
    wide, narrow = by_width[32], by_width[4]
    assert wide.state == optuna.trial.TrialState.PRUNED and wide.user_attrs["status"] == "over_memory"
    assert wide.user_attrs["memory"]["peak_bytes"] > limit * memory.GIB
    assert wide.user_attrs["memory"]["batch"] == 8 and "predicted peak" in wide.user_attrs["cause"]
    assert not Path(wide.user_attrs["run_dir"]).exists()  # no checkpoint, no training, not even a run directory
    assert narrow.state == optuna.trial.TrialState.COMPLETE
    assert (Path(narrow.user_attrs["run_dir"]) / "checkpoint.pt").is_file()

    console = Console(record=True, width=200)
    build_report(study_dir, console=console)
    text = console.export_text()
    assert f"over memory: trial {wide.number}: not trained, predicted peak" in text
    assert "over_memory" in text  # its leaderboard status


def test_ray_backend_prunes_over_memory_trials_the_same_way(tmp_path: Path) -> None:
    import optuna

    from nvae_search.search import ray_backend
    from nvae_search.spaces import load_space

    space = load_space(write_space(tmp_path, 0.001))
    with pytest.raises(OverMemory) as caught:
        ray_backend._trial_recipe(space, {"model.num_channels_enc": 4}, str(tmp_path))
    outcome = {**caught.value.attrs, "status": caught.value.status, "cause": str(caught.value)}
    state, values, attrs = ray_backend._decide({"final": 1, "invalid": 1, "outcome": outcome}, False, {})
    assert state == optuna.trial.TrialState.PRUNED and values is None
    assert attrs["status"] == "over_memory" and attrs["memory"]["peak_bytes"] > 0.001 * memory.GIB


OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total capacity)"


def search_where_the_wide_trial_steps_first_into(
    tmp_path: Path, before_train_step: Callable[[Any], None], before_step: Callable[[torch.Tensor], None]
) -> tuple[Path, Any, Any]:
    """The memory space (both branches predicted under its 1 GiB) searched with ``before_step`` run before every
    training step of the wide branch; returns the study directory and its wide and narrow trials."""
    from nvae_search.search.runner import load_study, run_optuna_search
    from nvae_search.spaces import load_space

    before_train_step(lambda trainer, x: before_step(x) if trainer.recipe.model.num_channels_enc == 32 else None)
    study_dir = run_optuna_search(load_space(write_space(tmp_path, 1.0)), root=tmp_path / "runs")
    by_width = {t.params["model.num_channels_enc"]: t for t in load_study(study_dir)[0].trials}
    return study_dir, by_width[32], by_width[4]


def test_a_trial_that_runs_out_of_cuda_memory_while_training_is_over_memory_and_the_search_goes_on(
    tmp_path: Path, before_train_step: Callable[[Any], None]
) -> None:
    """Both branches predicted under the space's 1 GiB, and the wide one runs out of CUDA memory all the same (a
    device with less free memory; raised here as torch raises it): that trial is PRUNED as over_memory with the
    error, the other trains. It ended the worker with a traceback."""
    import optuna
    from rich.console import Console

    from nvae_search.search.report import build_report

    def out_of_memory(_x: torch.Tensor) -> None:
        raise torch.cuda.OutOfMemoryError(OOM_MESSAGE + "\nIf reserved but unallocated memory is large ...")

    study_dir, wide, narrow = search_where_the_wide_trial_steps_first_into(tmp_path, before_train_step, out_of_memory)
    assert wide.state == optuna.trial.TrialState.PRUNED and wide.user_attrs["status"] == "over_memory"
    assert wide.user_attrs["oom"] == OOM_MESSAGE and "measured" in wide.user_attrs["cause"]
    assert narrow.state == optuna.trial.TrialState.COMPLETE
    console = Console(record=True, width=300)
    build_report(study_dir, console=console)
    assert f"trial {wide.number}: out of CUDA memory while training (measured): {OOM_MESSAGE}" in console.export_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA out-of-memory error needs a CUDA device")
def test_a_real_cuda_out_of_memory_error_in_a_trial_is_over_memory_and_the_next_trial_trains_on_cuda(
    tmp_path: Path, before_train_step: Callable[[Any], None]
) -> None:
    import optuna

    def petabyte(x: torch.Tensor) -> None:
        torch.empty(1 << 50, dtype=torch.uint8, device=x.device)  # 1 PiB: the caching allocator refuses it

    _study_dir, wide, narrow = search_where_the_wide_trial_steps_first_into(tmp_path, before_train_step, petabyte)
    assert wide.state == optuna.trial.TrialState.PRUNED and wide.user_attrs["status"] == "over_memory"
    assert "out of memory" in wide.user_attrs["oom"].lower()
    assert narrow.state == optuna.trial.TrialState.COMPLETE and narrow.user_attrs["peak_memory"] > 0  # on CUDA


def test_a_ray_trial_out_of_cuda_memory_is_pruned_as_over_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from ray import tune

    from nvae_search.search import ray_backend, ray_trainable
    from nvae_search.search.constraints import OutOfDeviceMemory, out_of_memory_as_over_memory

    with pytest.raises(OutOfDeviceMemory) as caught, out_of_memory_as_over_memory():
        raise torch.cuda.OutOfMemoryError(OOM_MESSAGE + "\nmore lines")
    reported: list[dict] = []
    monkeypatch.setattr(tune, "report", reported.append)
    ray_trainable._report_invalid({"run_dir": "r"}, caught.value, 1.5)
    state, values, attrs = ray_backend._decide(reported[0], False, {})
    assert state == optuna.trial.TrialState.PRUNED and values is None
    assert attrs["status"] == "over_memory" and attrs["oom"] == OOM_MESSAGE and "measured" in attrs["cause"]


@pytest.mark.parametrize("bad", [0, -1.0, "lots"])
def test_space_memory_limit_must_be_a_positive_number(tmp_path: Path, bad: object) -> None:
    from nvae_search.config_io import ConfigError
    from nvae_search.spaces import load_space

    path = write_space(tmp_path, 1.0)
    path.write_text(path.read_text().replace("gpu_memory_gib: 1.0", f"gpu_memory_gib: {bad}"))
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    assert any("constraints.gpu_memory_gib" in p for p, _ in caught.value.problems)


# ------------------------------------------------------------------------------------------- bench gpu
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_gpu_without_cuda_says_so_and_exits_0() -> None:
    result = invoke(["bench", "gpu"])
    assert result.exit_code == 0, result.output
    assert "no CUDA device" in result.output
    result = invoke(["bench", "gpu", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["cuda"] is False


def test_bench_gpu_function_without_cuda_returns_without_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from nvae_search.bench import GPU_BENCH_RECIPE, GPU_SETTINGS, bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_gpu(load_recipe(GPU_BENCH_RECIPE))["cuda"] is False
    assert {(p, c) for p, c in GPU_SETTINGS} == {(p, c) for p in ("fp16", "bf16", "fp32") for c in ("off", "cell")}


def test_the_gpu_checks_cpu_rehearsal_runs_every_part_of_it() -> None:
    """The GPU check's own code (each precision and checkpointing setting, fp16 with its scaler, evaluation,
    sampling, the JSON and the table) runs on the CPU, so no GPU time is lost to a defect in it."""
    from rich.console import Console

    from nvae_search.cli.tables import gpu_table

    result = invoke(["bench", "gpu", "--cpu-rehearsal", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cuda"] is False and report["device"] == "cpu (rehearsal)" and report["recipe"] == "cpu-tiny"
    settings = [(row["precision"], row["checkpointing"]) for row in report["train"]]
    assert settings == [(p, c) for p in ("fp16", "bf16", "fp32") for c in ("off", "cell")]
    for row in report["train"]:
        assert "error" not in row and row["step_s"] > 0 and row["predicted_peak_bytes"] > 0, row
    assert report["eval_sample"]["iw_image_passes_per_s"] > 0 and report["eval_sample"]["sample_s_per_image"] > 0
    console = Console(width=150, record=True, file=io.StringIO())
    console.print(gpu_table(report))
    text = console.export_text()
    assert "cpu-tiny on cpu (rehearsal)" in text and "image-passes/s" in text


def test_a_failing_setting_of_the_gpu_check_is_reported_in_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """One setting that raises (bf16 on an older GPU, an out-of-memory error) costs its row, not the other settings'
    figures; a failing evaluation costs its caption figures, not the table."""
    from rich.console import Console

    from nvae_search import bench
    from nvae_search.cli.tables import gpu_table

    def measure(recipe: Any, batch: int, precision: str, checkpointing: str, steps: int, device: str) -> Any:
        if precision == "bf16":
            raise RuntimeError("Current CUDA Device does not support bfloat16")
        if precision == "fp32" and checkpointing == "off":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"step_s": 0.1, "step_times_s": [0.1]}

    def evaluate(*args: Any) -> Any:
        raise ValueError("no sampler for this output")

    class Predictor:  # the predictions are tested elsewhere; here only where a failure lands
        def __init__(self, recipe: Any, device: str) -> None:
            pass

        def predict(self, batch: int, precision: str, checkpointing: str) -> Any:
            return SimpleNamespace(peak_bytes=1000)

    monkeypatch.setattr(bench, "_measure_train", measure)
    monkeypatch.setattr(bench, "_measure_eval_sample", evaluate)
    monkeypatch.setattr(memory, "MemoryPredictor", Predictor)
    report = bench.bench_gpu(load_recipe(TINY), steps=1, iw_images=2, iw_samples=2, chunk=2, sample_n=2, device="cpu")
    rows = {(row["precision"], row["checkpointing"]): row for row in report["train"]}
    assert rows[("bf16", "off")]["error"] == "RuntimeError: Current CUDA Device does not support bfloat16"
    assert {k: row["outcome"] for k, row in rows.items()} == {
        ("fp16", "off"): "ok",
        ("fp16", "cell"): "ok",
        ("bf16", "off"): "failed",
        ("bf16", "cell"): "failed",
        ("fp32", "off"): "out of memory",
        ("fp32", "cell"): "ok",
    }
    assert rows[("fp32", "cell")]["step_s"] == 0.1 and "predicted_peak_bytes" in rows[("fp32", "off")]
    assert report["eval_sample"]["outcome"] == "failed"
    console = Console(width=150, record=True, file=io.StringIO())
    console.print(gpu_table(report))
    text = console.export_text()
    assert text.count("failed") == 2 and text.count("OOM") == 1 and "ValueError: no sampler" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gpu_on_cuda_measures_every_setting_next_to_its_prediction() -> None:
    from nvae_search.bench import bench_gpu

    report = bench_gpu(load_recipe(TINY), batch=8, steps=1, iw_images=4, iw_samples=4, chunk=2, sample_n=4)
    assert report["cuda"] is True and len(report["train"]) == 6
    for row in report["train"]:
        # cuDNN workspaces can dwarf a tiny model's tensors, so only a prediction far above the measure is wrong.
        assert row["step_s"] > 0 and 0 < row["predicted_peak_bytes"] < 2 * row["measured_peak_bytes"], row
    assert report["eval_sample"]["iw_image_passes_per_s"] > 0


def test_a_torch_that_cannot_make_fake_cuda_tensors_falls_back_to_cpu_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if torch.backends.cuda.is_built():
        # A CUDA build without a GPU cannot pretend to have one: torch's own optimizer then asks the driver.
        pytest.skip("this torch is built with CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # claims CUDA; fake CUDA tensors then fail
    predictor = memory.MemoryPredictor(load_recipe(TINY), device="cuda")
    assert predictor.simulated_on == "cpu"
    prediction = predictor.predict(4, "fp32", "off")
    assert prediction.device == "cuda" and prediction.simulated_on == "cpu" and prediction.peak_bytes > 0


def test_the_prediction_is_for_one_process_of_a_global_batch() -> None:
    sets = ["--set", "train.global_batch_size=16", "--set", "train.batch_size=null"]
    result = invoke(["validate", str(TINY), "--json", "--memory", "--precision", "fp32", "--workers", "2", *sets])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["batch_per_process"] == summary["memory"]["batch"] == 8


@pytest.mark.parametrize(("name", "per_gpu"), [("mnist", 200), ("cifar10", 32), ("celebahq256", 4)])
def test_bench_gpu_takes_one_gpus_share_of_a_paper_recipes_global_batch(name: str, per_gpu: int) -> None:
    from nvae_search.bench import gpu_batch

    assert gpu_batch(load_recipe(ROOT / "recipes" / "paper" / f"{name}.yaml")) == per_gpu
    assert gpu_batch(load_recipe(TINY)) == 8


def test_the_space_memory_limit_is_checked_at_the_batch_of_one_process(tmp_path: Path) -> None:
    from nvae_search.search.constraints import check_memory_constraint
    from nvae_search.spaces import load_space

    space = load_space(write_space(tmp_path, 100.0))
    recipe = load_recipe(TINY, overrides={"train.batch_size": None, "train.global_batch_size": 16})
    assert check_memory_constraint(space, recipe, workers=2).batch == 8  # 16 over 2 processes
    assert check_memory_constraint(space, recipe, workers=1).batch == 16
