"""Storage URLs through the real `search` command: every unusable storage is exit 2 with one message naming the
URL and the reason, before anything is written; sqlite and relative journal paths work; a torn journal is
repaired."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.search.runner import load_study
from nvae_search.search.storage import repair_journal_tail

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
runner = CliRunner()


def write_space(folder: Path, name: str = "st", n_trials: int = 1, **extra: object) -> Path:
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": n_trials, "seed": 0},
        "budget": {"steps": 2, "eval_iw_samples": 2, "eval_images": 8, "report_every_steps": 1},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def search(*args: str) -> object:
    return runner.invoke(app, ["search", *args], env={"COLUMNS": "400"})


def flat(text: str) -> str:
    """The output with the panel's borders and line breaks removed, so that long paths can be matched."""
    return re.sub(r"[│╭╮╰╯─\s]+", " ", text)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def _cases(tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (extra CLI args or space storage, URL shown, reason shown)."""
    text = tmp / "notes.txt"
    text.write_text("shopping list\nmilk\n")
    (tmp / "adir").mkdir()
    return {
        "unknown scheme": (["space:foo://x"], "foo://x", "unknown database kind"),
        "sqlite folder missing": (
            [f"space:sqlite:///{tmp}/missing/dir/x.db"],
            f"sqlite:///{tmp}/missing/dir/x.db",
            "does not exist",
        ),
        "journal is a directory": (["space:journal:adir"], str(tmp / "adir"), "is a directory"),
        "cli journal is a text file": (["--storage", f"journal:{text}"], str(text), "is not an Optuna journal"),
        "cli sqlite is a text file": (["--storage", f"sqlite:///{text}"], str(text), "is not an SQLite database"),
        "cli not a url": (["--storage", "study.db"], "study.db", "expected an Optuna storage URL"),
        "cli unknown scheme": (["--storage", "foo://x"], "foo://x", "unknown database kind"),
        "unwritable location": (["--storage", "journal:/proc/nvae-test/s.journal"], "/proc/nvae-test", "not writable"),
        "below a file": (["--storage", f"journal:{text}/sub/s.journal"], str(text), "is not a directory"),
        "sqlite in memory": (["--storage", "sqlite://"], "sqlite://", "in-memory"),
    }


NAMES = [
    "unknown scheme",
    "sqlite folder missing",
    "journal is a directory",
    "cli journal is a text file",
    "cli sqlite is a text file",
    "cli not a url",
    "cli unknown scheme",
    "unwritable location",
    "below a file",
    "sqlite in memory",
]


@pytest.mark.parametrize("name", NAMES)
def test_an_unusable_storage_is_one_clean_error_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    args, url, reason = _cases(tmp_path)[name]
    storage = args[0].removeprefix("space:") if args[0].startswith("space:") else None
    path = write_space(tmp_path, storage=storage) if storage else write_space(tmp_path)
    cli_args = [] if storage else args
    before = {p: p.read_bytes() for p in files_under(tmp_path) if p.is_file()}
    result = search(str(path), "--root", str(tmp_path / "runs"), *cli_args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    shown = flat(result.output)
    assert url in shown and reason in shown, result.output
    assert "Traceback" not in result.output
    after = {p: p.read_bytes() for p in files_under(tmp_path) if p.is_file()}
    assert after == before, "nothing may be written or changed"
    assert not (tmp_path / "runs").exists()


def test_sqlite_storage_through_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "db" / "study.db"
    db.parent.mkdir()
    result = search(str(write_space(tmp_path)), "--root", str(tmp_path / "runs"), "--storage", f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    study, _, info = load_study(tmp_path / "runs" / "st")
    assert info["storage"] == f"sqlite:///{db}" and db.is_file()
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize(
    ("given", "recorded"),
    [("journal:shared/st.journal", "journal:{}/shared/st.journal"), ("sqlite:///st.db", "sqlite:///{}/st.db")],
)
def test_a_relative_storage_path_is_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str, recorded: str
) -> None:
    monkeypatch.chdir(tmp_path)
    result = search(str(write_space(tmp_path)), "--root", "runs", "--storage", given)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "runs" / "st" / "study.json").read_text())
    assert info["storage"] == recorded.format(tmp_path)
    monkeypatch.chdir(ROOT)  # report and resumes find the study from anywhere
    assert len(load_study(tmp_path / "runs" / "st")[0].trials) == 1


def test_a_torn_journal_tail_is_moved_aside_and_the_search_continues(tmp_path: Path) -> None:
    path = write_space(tmp_path)
    assert search(str(path), "--root", str(tmp_path / "runs")).exit_code == 0
    journal = tmp_path / "runs" / "st" / "study.journal"
    torn = b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "user_at'
    with open(journal, "ab") as fh:
        fh.write(torn)
    result = search(str(path), "--root", str(tmp_path / "runs"), "--n-trials", "2")
    assert result.exit_code == 0, result.output
    (backup,) = journal.parent.glob("study.journal.torn-*")
    assert backup.read_bytes() == torn and journal.read_bytes().endswith(b"\n")
    assert "torn record" in flat(result.output) and str(backup) in flat(result.output)
    assert len(load_study(tmp_path / "runs" / "st")[0].trials) == 2


RECORD = b'{"op_code": 0, "worker_id": "w", "study_name": "st", "directions": [1]}\n'
LONG_TORN = b'{"op_code": 5, "user_attr": "' + b"x" * (1 << 20)  # a record cut after more than 1 MiB


@pytest.mark.parametrize(
    ("content", "kept", "moved"),
    [
        (RECORD * 2, RECORD * 2, None),  # intact: no backup, no warning
        (RECORD + b'{"op_code": 5, "tri', RECORD, b'{"op_code": 5, "tri'),
        (b'{"op_code": 0, "work', b"", b'{"op_code": 0, "work'),  # the first record itself torn
        (RECORD + LONG_TORN, RECORD + LONG_TORN, None),  # no newline in the last MiB: left to Optuna
    ],
    ids=["intact", "torn-tail", "torn-first-record", "tail-over-1-MiB"],
)
def test_a_journal_loses_exactly_its_torn_tail_and_an_intact_one_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, kept: bytes, moved: bytes | None
) -> None:
    journal = tmp_path / "study.journal"
    journal.write_bytes(content)
    backup = repair_journal_tail(journal)
    assert journal.read_bytes() == kept
    backups = list(tmp_path.glob("study.journal.torn-*"))
    warning = capsys.readouterr().err
    if moved is None:
        assert backup is None and backups == [] and warning == ""
    else:
        assert backups == [backup] and backup.read_bytes() == moved
        assert "torn record" in warning and f"({len(moved)} bytes without a newline)" in warning
