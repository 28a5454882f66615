"""Parsers and the state table, on output captured from the dev cluster (tests/golden/slurm/captured/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.backends.base import JobRef, JobState
from launcher.backends.slurm import (
    SACCT_FIELDS, SLURM_STATES, SQUEUE_FIELDS, SlurmBackend, attempt_logs, explain_reason, parse_rows,
    parse_state, status_from_sacct, status_from_squeue,
)

CAPTURED = Path(__file__).resolve().parent / "golden" / "slurm" / "captured"


def rows(name: str, fields: list[str]) -> dict[str, dict[str, str]]:
    return {r[fields[0]]: r for r in parse_rows((CAPTURED / name).read_text(), fields)}


def test_squeue_pending_reasons_running() -> None:
    got = rows("squeue.txt", SQUEUE_FIELDS)
    quota = status_from_squeue(got["12"])
    assert quota.state == JobState.PENDING
    assert "team's GPU quota" in quota.reason and "AssocGrpGRES" in quota.reason
    assert status_from_squeue(got["13"]).reason.startswith("not before its begin time")
    assert "held by its user" in status_from_squeue(got["15"]).reason
    running = status_from_squeue(got["11"])
    assert running.state == JobState.RUNNING and running.detail == "on node1"


def test_squeue_after_requeue_is_requeued() -> None:
    got = rows("squeue-requeued.txt", SQUEUE_FIELDS)["11"]
    st = status_from_squeue(got)
    assert st.state == JobState.REQUEUED and "BeginTime" in st.reason and st.detail == "restart 1"


def test_sacct_final_states() -> None:
    got = rows("sacct.txt", SACCT_FIELDS)
    assert status_from_sacct(got["10"]).state == JobState.COMPLETED
    cancelled = status_from_sacct(got["12"])
    assert cancelled.state == JobState.CANCELLED and cancelled.reason == "cancelled by 0"
    failed = status_from_sacct(got["14"])
    assert failed.state == JobState.FAILED and "exit code 3:0" in failed.detail


@pytest.mark.parametrize("text,state", [
    ("RUNNING", JobState.RUNNING), ("CANCELLED by 1000", JobState.CANCELLED), ("OUT_OF_MEMORY", JobState.FAILED),
    ("NODE_FAIL", JobState.FAILED), ("TIMEOUT", JobState.TIMEOUT), ("PREEMPTED", JobState.PREEMPTED),
    ("REQUEUED", JobState.REQUEUED), ("COMPLETING", JobState.RUNNING), ("SOMETHING_NEW", JobState.UNKNOWN),
    ("", JobState.UNKNOWN), ("completed", JobState.COMPLETED),
])
def test_state_table(text: str, state: JobState) -> None:
    assert parse_state(text) == state


def test_every_table_entry_is_a_job_state() -> None:
    assert all(isinstance(v, JobState) for v in SLURM_STATES.values())


def test_unknown_reason_is_shown_as_is() -> None:
    assert explain_reason("SomeNewReason") == "Slurm reason: SomeNewReason"
    assert explain_reason("None") == "" and explain_reason("") == ""


def test_unknown_state_does_not_crash() -> None:
    st = status_from_squeue({"JobID": "1", "State": "WEIRD", "Reason": "None", "RestartCnt": "0", "NodeList": ""})
    assert st.state == JobState.UNKNOWN and "WEIRD" in st.reason
    assert status_from_sacct({"State": "WEIRD"}).state == JobState.UNKNOWN


def test_short_rows_are_padded() -> None:
    assert parse_rows("5|RUNNING\n\n", SQUEUE_FIELDS) == [
        {"JobID": "5", "State": "RUNNING", "Reason": "", "RestartCnt": "", "NodeList": ""}]


def test_logs_follow_the_newest_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for n in (0, 1, 10, 2):
        (logs / f"attempt-{n}.log").write_text(f"attempt {n}\n")
    assert [p.name for p in attempt_logs(str(tmp_path))][-1] == "attempt-10.log"
    backend = SlurmBackend()
    ref = JobRef("slurm", "1", "x", str(tmp_path))
    assert list(backend.logs(ref)) == ["attempt 10\n"]


def test_commands_missing_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.errors import BackendError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackendError, match="not a Slurm login node"):
        SlurmBackend().status(JobRef("slurm", "1", "x", "/tmp"))
