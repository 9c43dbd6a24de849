"""The one status vocabulary: members are the very strings that summary.json, the leaderboard and Optuna's user
attributes have always held, so files written before the enum read the same and new files look the same."""

from __future__ import annotations

import csv
import io
import json

from nvae_search.search.report_rows import RUN_STATUSES, STATUS_ORDER
from nvae_search.search.trial import TrialOutcome
from nvae_search.status import TrialStatus

WRITTEN = {
    "completed",
    "pruned",
    "diverged",
    "exploded",
    "collapsed",
    "spiky",
    "failed",
    "invalid",
    "over_memory",
    "interrupted",
    "running",
    "waiting",
    "stopped",
    "error",
}


def test_every_status_is_written_as_its_plain_string() -> None:
    assert {s.value for s in TrialStatus} == WRITTEN
    for status in TrialStatus:
        assert status == status.value and str(status) == status.value and f"{status}" == status.value
        assert json.dumps({"status": status}) == json.dumps({"status": status.value})
        out = io.StringIO()
        csv.writer(out).writerow([status])
        assert out.getvalue().strip() == status.value


def test_a_status_read_back_from_a_file_is_the_member() -> None:
    outcome = TrialOutcome.from_attrs({"status": json.loads('"diverged"')})
    assert outcome.status is TrialStatus.DIVERGED
    assert {"diverged": 1}[TrialStatus.DIVERGED] == 1 and {TrialStatus.PRUNED: 1}["pruned"] == 1


def test_the_report_orders_every_trial_status() -> None:
    # A run's own "stopped" shows as pruned and Ray's "error" as failed, so neither needs a place of its own.
    assert set(STATUS_ORDER) == set(TrialStatus) - {TrialStatus.STOPPED, TrialStatus.ERROR}
    assert set(STATUS_ORDER) >= RUN_STATUSES
