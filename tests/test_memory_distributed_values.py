"""Values of the memory prediction, the data-parallel launcher and the checkpoint checks against hand-computed
references.

Guards (each test kills a mutation the rest of the suite let through, in a hand-made mutation round):

* ``nvae_search/memory.py``: what a GPU sold as N GB leaves a tensor peak (N GiB less 10 %, less 0.5 GiB), "fits" up
  to and including that figure, the largest batch on both sides of each limit (equality fits, the cap reached,
  batch 1 alone, the line's guess when steps cannot be replayed), the fits of ``memory_report`` per GPU size, the
  text form (GiB from 1 GiB up, MiB of 2^20 bytes, only the sizes that fit), every tensor in whole 512-byte blocks
  on CUDA and exact bytes on the CPU, and the EMA copy (``AveragedModel``: the model's parameters and buffers and
  its step counter) added to the peak;
* ``nvae_search/memory_trace.py`` and ``memory_tracking.py``: rounding to blocks (an exact multiple stays), gradients
  in blocks in a replay as in the tracker, the first of two equal peaks kept with its breakdown, a transient on top
  of what is live, a peak reset to what is live;
* ``nvae_search/memory_step.py``: the simulated Adamax is the trainer's (weight decay included);
* ``nvae_search/memory_cache.py``: ``OFF`` in any case turns the store off, a network's folder differs by target
  device and by where the step was simulated, a fit keeps the batch-1 trace, the size limit counts the network's
  own folder and is inclusive;
* ``nvae_search/distributed.py``: torchrun is recognised only from all its variables, its world is ``WORLD_SIZE``,
  a global batch the world does not divide is refused, what ``train_data_parallel`` checks and hands its workers
  before spawning them (stubbed: nothing is spawned), the threads a torchrun rank takes;
* ``nvae_search/checkpoint.py``: step 0 is valid and a boolean step is not, weight names must be strings, every
  missing entry is named, at most three mismatching weight names are listed.
"""

from __future__ import annotations

import inspect
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import event_trace
from torch.optim.swa_utils import AveragedModel

from nvae_search import distributed, memory, memory_cache, memory_step, memory_trace
from nvae_search.checkpoint import CheckpointError, check_weights, load_checkpoint, save_checkpoint
from nvae_search.memory_tracking import StorageTracker
from nvae_search.schema import load_recipe
from nvae_search.training.state import RunDirError

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
GIB = 2**30

# A GPU sold as N GB: N GiB, less 10 % (fragmentation, workspaces), less 0.5 GiB (CUDA context), in whole bytes.
USABLE = {16: 14_925_011_353, 24: 22_655_952_486, 40: 38_117_834_752, 80: 76_772_540_416}


def test_usable_bytes_are_the_gib_less_a_tenth_less_half_a_gib() -> None:
    for size, expected in USABLE.items():
        assert expected == int(Fraction(size * GIB) * Fraction(9, 10) - Fraction(GIB, 2))  # the hand figures
        assert memory.usable_bytes(size) == expected, size


def prediction(peak: int, batch: int = 4) -> memory.MemoryPrediction:
    return memory.MemoryPrediction("cuda", batch, "fp32", "off", peak, peak, 0, 0, 0, "cpu")


def test_a_peak_fits_up_to_and_including_the_usable_bytes() -> None:
    for size, usable in USABLE.items():
        assert memory.fits(prediction(usable), size)
        assert not memory.fits(prediction(usable + 1), size)


# ------------------------------------------------------------------------------------- the largest batch
PER_IMAGE = 2**21


class AffinePredictor:
    """Stands in for MemoryPredictor: peak = fixed + PER_IMAGE × batch; replays once two batches >= 2 were asked."""

    def __init__(self, fixed: int, replay: bool = True) -> None:
        self.fixed, self.replay = fixed, replay
        self.asked: list[int] = []

    def peak(self, batch: int) -> int:
        return self.fixed + PER_IMAGE * batch

    def predict(
        self, batch: int | None = None, precision: str | None = None, checkpointing: str | None = None
    ) -> memory.MemoryPrediction:
        assert batch is not None
        self.asked.append(batch)
        return prediction(self.peak(batch), batch)

    def can_replay(self, precision: str, checkpointing: str) -> bool:
        return self.replay and len({b for b in self.asked if b >= 2}) >= 2


def largest(fake: AffinePredictor, base_batch: int, limits: dict[str, int], **kw: Any) -> dict[str, int]:
    base = fake.predict(base_batch)  # the base step, traced like any other
    return memory.largest_batches(fake, base, limits, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("replay", [True, False])
def test_the_largest_batch_is_the_last_whose_peak_stays_within_the_limit(replay: bool) -> None:
    fake = AffinePredictor(10 * 2**20, replay=replay)
    limits = {
        "equal": fake.peak(37),  # found by bisection between 32 and 64: equality fits
        "one under": fake.peak(37) - 1,
        "between": fake.peak(100) + PER_IMAGE // 2,
        "power of two": fake.peak(64),
        "none": fake.peak(1) - 1,
    }
    assert largest(fake, 4, limits) == {"equal": 37, "one under": 36, "between": 100, "power of two": 64, "none": 0}
    assert fake.asked[:2] == [4, 8]  # the base batch, then twice it


def test_the_largest_batch_stops_at_the_cap_and_may_be_one() -> None:
    fake = AffinePredictor(10 * 2**20)
    huge = {"huge": fake.peak(10**6)}
    assert largest(fake, 4, huge, cap=64) == {"huge": 64}
    assert largest(fake, 4, huge, cap=100) == {"huge": 100}
    assert largest(fake, 4, {"one": fake.peak(1), "under one": fake.peak(1) - 1}) == {"one": 1, "under one": 0}


def test_from_a_base_batch_of_one_the_steps_traced_are_batches_two_and_four() -> None:
    """Batch 1 is never replayed from a fit (batch norm may refuse it): the two traced steps are 2 and 4."""
    fake = AffinePredictor(10 * 2**20)
    assert largest(fake, 1, {"x": fake.peak(50)}) == {"x": 50}
    assert fake.asked[:3] == [1, 2, 4]


def test_memory_report_says_which_gpu_sizes_fit_and_their_largest_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = USABLE[24] - 4 * PER_IMAGE  # at batch 4 the peak is exactly what a 24 GB GPU leaves
    monkeypatch.setattr(memory, "MemoryPredictor", lambda recipe, progress=None: AffinePredictor(fixed))
    report = memory.memory_report(load_recipe(TINY), batch=4)
    assert report["peak_bytes"] == USABLE[24] and report["batch"] == 4
    assert report["fits_gb"] == {"16": False, "24": True, "40": True, "80": True}
    assert report["largest_batch"] == {
        str(size): max(0, (usable - fixed) // PER_IMAGE) for size, usable in USABLE.items()
    }
    assert report["largest_batch"]["24"] == 4 and report["largest_batch"]["16"] == 0


def test_bytes_are_written_in_gib_from_one_gib_and_in_mib_of_two_to_the_twenty_below() -> None:
    assert memory.format_bytes(GIB) == "1.00 GiB"
    assert memory.format_bytes(GIB - 2**19) == "1023.5 MiB"
    assert memory.format_bytes(3 * 2**20) == "3.0 MiB"


def test_the_text_names_only_the_sizes_that_fit() -> None:
    report: dict[str, Any] = {
        **prediction(3 * 2**20).to_dict(),
        "fits_gb": {"16": False, "24": True, "40": True, "80": True},
    }
    assert memory.memory_lines(report)[1] == "fits on 24 / 40 / 80 GB at batch 4"
    report["fits_gb"] = dict.fromkeys(report["fits_gb"], False)
    assert memory.memory_lines(report)[1] == "fits on none of 16 / 24 / 40 / 80 GB at batch 4"


# ------------------------------------------------------------------------------------- bytes of the step
def blocks(nbytes: int, block: int = 512) -> int:
    return -(-nbytes // block) * block


def storage_bytes(tensors: Any, block: int) -> int:
    return sum(blocks(t.untyped_storage().nbytes(), block) for t in tensors)


@pytest.fixture(scope="module")
def real_parts() -> memory_step.StepParts:
    """The tiny recipe's network and regulariser on real CPU tensors (the reference for the fake ones)."""
    return memory_step.build_step_parts(load_recipe(TINY), 1, "fp32", False, foreach=False)


@pytest.fixture(scope="module")
def predictor() -> memory.MemoryPredictor:
    return memory.MemoryPredictor(load_recipe(TINY), "cuda", replay=False, cache=False)


def test_params_are_counted_in_whole_cuda_blocks_and_an_ema_copy_adds_the_model_once(
    real_parts: memory_step.StepParts, predictor: memory.MemoryPredictor
) -> None:
    """On CUDA every tensor takes whole 512-byte blocks: parameters, buffers and the power-iteration vectors. With
    ``train.ema_decay`` the trainer's ``AveragedModel`` holds a copy of the model's parameters and buffers and a
    step counter, all the step long: the peak and the parameter bytes grow by it, nothing else moves."""
    model, spectral = real_parts.model, real_parts.spectral
    state = [*model.parameters(), *model.buffers()]
    plain = predictor.predict(2, "fp32", "off")
    assert plain.params_bytes == storage_bytes([*state, *spectral.buffers()], 512)

    averaged = AveragedModel(model, use_buffers=True)
    ema_bytes = storage_bytes([*averaged.parameters(), *averaged.buffers()], 512)
    assert ema_bytes == storage_bytes(state, 512) + 512  # the copy and its counter (n_averaged)
    recipe, predictor.recipe = predictor.recipe, load_recipe(TINY, overrides={"train.ema_decay": 0.999})
    try:
        with_ema = predictor.predict(2, "fp32", "off")
    finally:
        predictor.recipe = recipe
    assert with_ema.peak_bytes == plain.peak_bytes + ema_bytes
    assert with_ema.params_bytes == plain.params_bytes + ema_bytes
    assert (with_ema.grads_bytes, with_ema.optimizer_bytes, with_ema.activations_bytes) == (
        plain.grads_bytes,
        plain.optimizer_bytes,
        plain.activations_bytes,
    )


def test_adamax_state_on_cuda_is_its_two_moments_the_step_counts_stay_on_the_host(
    real_parts: memory_step.StepParts, predictor: memory.MemoryPredictor
) -> None:
    """torch's Adamax (not ``capturable``) keeps each parameter's step count in host memory: the GPU holds the first
    moment and the infinity norm, each a parameter's size in whole blocks."""
    params = list(real_parts.model.parameters())
    assert predictor.predict(2, "fp32", "off").optimizer_bytes == 2 * storage_bytes(params, 512)
    optimizer = torch.optim.Adamax(params)
    memory_step.init_optimizer_state(optimizer)
    on_gpu = list(memory_step.state_tensors(optimizer, "cuda"))
    assert len(on_gpu) == 2 * len(params) and all(t.dim() > 0 for t in on_gpu)
    assert len(list(memory_step.state_tensors(optimizer, "cpu"))) == 3 * len(params)  # host memory: all
    capturable = torch.optim.Adamax([torch.zeros(3)], capturable=True)
    capturable.state[capturable.param_groups[0]["params"][0]] = {"step": torch.zeros(()), "exp_avg": torch.zeros(3)}
    assert len(list(memory_step.state_tensors(capturable, "cuda"))) == 2  # its steps live on the GPU


def test_the_optimizer_phase_adds_what_it_allocates_above_what_is_live(
    real_parts: memory_step.StepParts, predictor: memory.MemoryPredictor
) -> None:
    """The gradient norm and the multi-tensor Adamax step run on real CPU tensors, counted in CUDA blocks: what they
    allocate above the parameters, gradients and state alive when they start is what the prediction adds."""
    params = [p.detach().clone() for p in real_parts.model.parameters()]
    optimizer = torch.optim.Adamax(params, **{**real_parts.optimizer.defaults, "foreach": True})
    memory_step.init_optimizer_state(optimizer)  # a steady step: the state exists
    tracker = StorageTracker(block_bytes=512)
    for p in params:
        p.grad = torch.ones_like(p)
        tracker.track(p.grad, "grads")
    for t in (*params, *memory_step.state_tensors(optimizer)):
        tracker.track(t, "params")
    live = tracker.current
    tracker.reset_peak()
    with tracker:
        memory_step.update(params, optimizer)
    assert tracker.peak - live > 0
    assert predictor.optimizer_extra_bytes == tracker.peak - live


def test_the_simulated_adamax_is_the_trainers(real_parts: memory_step.StepParts) -> None:
    train = load_recipe(TINY).train
    assert train.weight_decay > 0  # or the test proves nothing
    reference = torch.optim.Adamax(
        real_parts.model.parameters(),
        lr=train.learning_rate,
        betas=(0.9, 0.999),
        eps=train.adamax_eps,
        weight_decay=train.weight_decay,
    )
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert real_parts.optimizer.defaults[key] == reference.defaults[key], key


def test_the_tracker_rounds_each_storage_up_to_whole_blocks_and_counts_gradients_alike() -> None:
    tracker = StorageTracker(block_bytes=512)
    with tracker:
        exact = torch.empty(128)  # 512 bytes: one block, not two
        assert tracker.current == 512
        over = torch.empty(129)  # 516 bytes: two blocks
        assert tracker.current == 512 + 1024
    tracker.add_grad(torch.empty(1).untyped_storage())  # 4 bytes of gradient: one block
    tracker.reset_peak()
    assert tracker.peak_by_kind == {"activations": 1536, "grads": 512}
    assert memory_trace.rounded(np.array([0, 1, 511, 512, 513, 1024]), 512).tolist() == [0, 512, 512, 512, 1024, 1024]
    del exact, over


def test_a_reset_peak_is_what_is_live_and_a_transient_counts_on_top_of_it() -> None:
    tracker = StorageTracker()
    params = torch.empty(250)  # 1,000 bytes
    tracker.track(params, "params")
    with tracker:
        temporary = torch.empty(500)  # 2,000 bytes, then freed
        del temporary
    assert (tracker.current, tracker.peak) == (1000, 3000)
    tracker.reset_peak()
    assert tracker.peak == 1000
    tracker.add_transient(10)
    assert tracker.peak == 1010 and tracker.peak_by_kind == {"params": 1000, "activations": 0, "grads": 0}
    tracker.add_transient(5)  # 1,005 < 1,010: no new peak
    assert tracker.peak == 1010


def test_a_replay_counts_gradients_in_blocks_and_keeps_the_first_of_two_equal_peaks() -> None:
    trace = event_trace(2, [("params", 1000), ("reset", 0), ("grad", 100), ("activations", 2000), ("end", 0)])
    fit = memory_trace.AffineTrace.of(trace)
    assert fit is not None
    assert fit.replay(2, 512) == (1024 + 2048, {"params": 1024, "activations": 2048, "grads": 512})
    assert fit.replay(2, 1) == (3000, {"params": 1000, "activations": 2000, "grads": 100})

    # The optimizer phase reaches the backward pass's peak exactly: the peak's breakdown stays the earlier one's,
    # as the tracker keeps it (a new peak must be higher).
    tied = event_trace(2, [("params", 1000), ("reset", 0), ("activations", 500), ("free", 1), ("end", 0)])
    fit = memory_trace.AffineTrace.of(tied)
    assert fit is not None
    assert fit.replay(2, 1, after_end=500) == (1500, {"params": 1000, "activations": 500, "grads": 0})
    assert fit.replay(2, 1, after_end=501) == (1501, {"params": 1000, "activations": 0, "grads": 0})
    tracker, params = StorageTracker(), torch.empty(250)
    tracker.track(params, "params")
    tracker.reset_peak()
    with tracker:
        del_me = torch.empty(125)
        del del_me
    tracker.add_transient(500)
    assert (tracker.peak, tracker.peak_by_kind) == (1500, {"params": 1000, "activations": 500, "grads": 0})


# ------------------------------------------------------------------------------------- the disk store
@pytest.mark.parametrize("value", ["OFF", " Off ", "0", "none", "False"])
def test_the_store_is_off_in_any_spelling(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory_cache.CACHE_ENV, value)
    assert memory_cache.cache_root() is None


def test_a_networks_store_folder_depends_on_the_target_device_and_where_it_was_simulated(tmp_path: Path) -> None:
    recipe = load_recipe(TINY)
    folders = {
        (device, simulated): memory_cache.TraceStore(tmp_path, recipe, device, simulated).folder
        for device, simulated in [("cuda", "cpu"), ("cuda", "cuda"), ("cpu", "cpu")]
    }
    assert len(set(folders.values())) == 3
    assert memory_cache.TraceStore(tmp_path, recipe, "cuda", "cpu").folder == folders[("cuda", "cpu")]


def test_a_fit_replaces_the_traces_of_batches_from_two_but_keeps_batch_one(tmp_path: Path) -> None:
    store = memory_cache.TraceStore(tmp_path, load_recipe(TINY), "cuda", "cpu")
    setting = ("fp32", "off")

    def step(batch: int) -> memory_trace.StepTrace:
        return event_trace(batch, [("params", 1000), ("reset", 0), ("activations", 10 * batch), ("end", 0)])

    for batch in (1, 2, 3):
        store.save_trace(setting, step(batch))
    assert store.traced_batches(setting) == [1, 2, 3]
    fit = memory_trace.AffineTrace.fit(step(2), step(3))
    assert fit is not None
    store.save_fit(setting, fit)
    assert store.traced_batches(setting) == [1]  # batch 1 is never replayed from a fit: its own trace stays


@pytest.mark.parametrize(("over", "kept"), [(0, True), (1, False)])
def test_the_store_limit_counts_the_new_networks_own_folder_and_is_inclusive(
    over: int, kept: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = memory_cache.TraceStore(tmp_path, load_recipe(TINY), "cuda", "cpu")
    old = tmp_path / "old"
    old.mkdir()
    (old / "fp32-off-b4.npz").write_bytes(b"x" * 1000)
    entry = b'{"value": 5}'  # what save_number writes
    monkeypatch.setattr(memory_cache, "STORE_MAX_BYTES", 1000 + len(entry) - over)
    store.save_number("optimizer-wd1", 5)
    assert (store.folder / "optimizer-wd1.json").read_bytes() == entry
    assert old.exists() is kept


# ------------------------------------------------------------------------------------- data parallel
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def torchrun_env(monkeypatch: pytest.MonkeyPatch, names: Any) -> None:
    for name in ("LOCAL_WORLD_SIZE", *TORCHRUN):
        monkeypatch.delenv(name, raising=False)
    for name in names:
        monkeypatch.setenv(name, TORCHRUN[name])


def test_a_torchrun_launch_is_recognised_only_from_all_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun_env(monkeypatch, TORCHRUN)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 4 nodes of 2: the world is all 8 ranks
    assert distributed.launched_by_torchrun() and distributed.torchrun_world_size() == 8
    for missing in TORCHRUN:
        torchrun_env(monkeypatch, [n for n in TORCHRUN if n != missing])
        assert not distributed.launched_by_torchrun(), missing
        assert distributed.torchrun_world_size() is None


def test_a_global_batch_the_processes_do_not_divide_is_a_problem() -> None:
    recipe = load_recipe(TINY, overrides={"train.global_batch_size": 16, "train.batch_size": None})
    assert distributed.batch_problem(recipe, 4) is None and distributed.batch_problem(recipe, 16) is None
    problem = distributed.batch_problem(recipe, 3)
    assert problem is not None and "16 is not divisible by the 3 processes" in problem


def test_the_default_backend_is_nccl_with_cuda_and_gloo_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.default_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.default_backend() == "gloo"


class Spawned(Exception):
    """Raised by the stand-in for torch's process starter: what the workers would have been given."""

    def __init__(self, args: tuple[Any, ...], nprocs: int) -> None:
        super().__init__("spawned")
        self.args_, self.nprocs = args, nprocs


@pytest.fixture
def no_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing as mp

    def start_processes(fn: Any, args: tuple[Any, ...], nprocs: int, **kwargs: Any) -> Any:
        raise Spawned(args, nprocs)

    monkeypatch.setattr(mp, "start_processes", start_processes)


def spawn_args(out: Path, workers: int, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(Spawned) as caught:
        distributed.train_data_parallel(load_recipe(TINY), out, workers, **kwargs)
    assert caught.value.nprocs == workers
    # Named by the worker's own signature (the starter passes the rank first), so a reordered argument list still
    # reads each value under its name.
    given = inspect.signature(distributed._worker).bind(0, *caught.value.args_).arguments
    return {
        "world": given["world"],
        "backend": given["backend"],
        "device": given["device_kind"],
        "out": given["out_dir"],
        "resume": given["resume"],
        "threads": given["threads"],
    }


def test_what_data_parallel_hands_its_workers(tmp_path: Path, no_spawn: None, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        args = spawn_args(tmp_path / "run", 2, backend="gloo")
        expected = {"world": 2, "backend": "gloo", "device": "cpu", "out": str(tmp_path / "run"), "resume": False}
        assert args == {**expected, "threads": 2}  # this process's 4 threads shared by 2 workers
        assert spawn_args(tmp_path / "run", 3, backend="gloo")["threads"] == 1
        assert spawn_args(tmp_path / "run", 2, backend="gloo", threads_per_worker=3)["threads"] == 3
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    nccl = spawn_args(tmp_path / "run", 2, backend="nccl")  # as many devices as workers: enough
    assert (nccl["backend"], nccl["device"]) == ("nccl", "cuda")
    with pytest.raises(ValueError, match="3 nccl workers need 3 visible CUDA devices, found 2"):
        distributed.train_data_parallel(load_recipe(TINY), tmp_path / "run", 3, backend="nccl")


def test_data_parallel_refuses_before_spawning(tmp_path: Path, no_spawn: None) -> None:
    recipe = load_recipe(TINY)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        distributed.train_data_parallel(recipe, tmp_path / "run", 0)
    with pytest.raises(ValueError, match="backend must be gloo or nccl, got 'mpi'"):
        distributed.train_data_parallel(recipe, tmp_path / "run", 2, backend="mpi")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # a stale summary of an earlier attempt
    spawn_args(run, 2, backend="gloo")
    assert not (run / "summary.json").exists()
    (run / "checkpoint.pt").write_bytes(b"a run")
    with pytest.raises(RunDirError, match="already holds a run"):
        distributed.train_data_parallel(recipe, run, 2, backend="gloo")


def test_a_torchrun_rank_shares_the_cores_with_the_ranks_on_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    def joined(*args: Any, **kwargs: Any) -> None:
        raise Spawned((), 0)

    torchrun_env(monkeypatch, TORCHRUN)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("NVAE_SEARCH_DEFAULT_MALLOC", "1")
    monkeypatch.setattr(dist, "init_process_group", joined)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        with pytest.raises(Spawned):
            distributed.train_under_torchrun(load_recipe(TINY), "unused", device="cpu")
        assert torch.get_num_threads() == 2  # 4 cores, 2 ranks on this node (of 8 in all)
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_step_may_be_zero_but_not_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "step": 0})
    assert load_checkpoint(path, required=("model", "step"))["step"] == 0
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "step": True})
    with pytest.raises(CheckpointError, match="step is True, expected a non-negative integer"):
        load_checkpoint(path)


def test_checkpoint_weights_are_named_by_strings_and_every_missing_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {0: torch.zeros(1)}, "step": 1})
    with pytest.raises(CheckpointError, match="model is not a mapping of weight names to tensors"):
        load_checkpoint(path)
    save_checkpoint(path, {"step": 1})
    with pytest.raises(CheckpointError, match="the checkpoint lacks model, optimizer"):
        load_checkpoint(path, required=("model", "step", "optimizer"))
    with pytest.raises(CheckpointError, match=r"the checkpoint lacks model \("):
        load_checkpoint(path, required=("model",))


def test_at_most_three_mismatching_weight_names_are_listed() -> None:
    module = torch.nn.Module()
    for name in ("a", "b", "c", "d"):
        module.register_buffer(name, torch.zeros(1))
    weights = {"a": torch.zeros(1)}
    with pytest.raises(CheckpointError) as caught:
        check_weights(module, weights, "ckpt")
    assert str(caught.value).endswith("3 weights of the recipe's network are missing (b, c, d)")
    with pytest.raises(CheckpointError) as caught:
        check_weights(module, {}, "ckpt")
    assert str(caught.value).endswith("4 weights of the recipe's network are missing (a, b, c, … 1 more)")
