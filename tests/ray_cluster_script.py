"""A Ray search on a two-node cluster on this machine, losing its worker node mid-trial (run by tests/test_ray.py).

Usage: ``python tests/ray_cluster_script.py SPACE_FILE ROOT OUT_JSON``. Starts ``ray.cluster_utils.Cluster`` with
a head node and one worker node (1 CPU each), so two concurrent trials land one per node. Once the trial on the
worker node has handed Ray a checkpoint, the node is removed (its processes are killed); the search must finish
anyway. Writes what happened to OUT_JSON. A separate process, because one process holds one Ray instance.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def attempts(run_dir: Path) -> list[dict]:
    log = run_dir / "ray_attempts.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def ray_checkpoint_step(study_dir: Path, trial_id: str) -> int:
    """The report step of the newest complete Ray checkpoint of a trial (0: none yet)."""
    steps = [0]
    for state in study_dir.glob(f"ray/*/*{trial_id}*/checkpoint_*/ray_state.json"):
        try:
            steps.append(int(json.loads(state.read_text())["reported_step"]))
        except (OSError, ValueError, KeyError):
            continue  # being written
    return max(steps)


def main() -> None:
    space_file, root, out_json = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import ray
    from ray.cluster_utils import Cluster

    from nvae_search.search.ray_backend import run_ray_search
    from nvae_search.search.runner import load_study
    from nvae_search.spaces import load_space

    space = load_space(space_file)
    report: dict = {"removed": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report["worker_node_id"] = worker.node_id
    trials_dir = root / space.study.name / "trials"

    def kill_worker_mid_trial() -> None:
        # The node goes once Ray holds a checkpoint of the trial running on it, so the restarted attempt must resume
        # from a step >= 2. A checkpoint folder is on disk before the driver has processed its report: waiting for
        # the second folder (step 4) makes sure the first (step 2) was registered (with the first alone, 1 full
        # suite in 4 saw the node removed in between and the trial restarted from scratch).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for run_dir in trials_dir.glob("ray_*"):
                on_worker = any(a.get("node_id") == worker.node_id for a in attempts(run_dir))
                step = ray_checkpoint_step(root / space.study.name, run_dir.name.removeprefix("ray_"))
                if on_worker and step >= 4:
                    report.update(removed=True, removed_after_checkpoint_of_step=step, victim=run_dir.name)
                    cluster.remove_node(worker, allow_graceful=False)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_worker_mid_trial, daemon=True)
    killer.start()
    start = time.perf_counter()
    study_dir = run_ray_search(space, root=root)
    report["search_s"] = time.perf_counter() - start
    killer.join(timeout=1)
    study = load_study(study_dir)[0]
    report["trials"] = [
        {
            "number": t.number,
            "state": t.state.name,
            "values": t.values,
            "status": t.user_attrs.get("status"),
            "run_dir": t.user_attrs.get("run_dir"),
            "steps": t.user_attrs.get("steps"),
        }
        for t in study.trials
    ]
    report["attempts"] = {d.name: attempts(d) for d in sorted(trials_dir.glob("ray_*"))}
    out_json.write_text(json.dumps(report, indent=2))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
