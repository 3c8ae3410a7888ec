"""tauon.local.sweep: the operator's sweep planner executed locally against fake trial runners (no
training): creates start trial runs, deletes stop them, patches annotate and prune them, status.json is the
sweep's status, a second run resumes from DIR; and a pruned local FineTuneJob run (tauon.local.run)."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tauon.api import FineTuneJob, FineTuneSweep, FineTuneSweepStatus
from tauon.api.names import ANN_PRUNE, ANN_TRIAL_PARAMETERS, FINETUNEJOB, LABEL_SWEEP, LABEL_TRIAL
from tauon.local import sweep as ls
from tauon.local.run import EXIT_PRUNED, JobStatus, prune_message, run_finetunejob
from tauon.reconcile.plan import Plan
from tauon.render.config import OperatorConfig

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
RATES = [1e-4, 1e-3, 1e-2]


def make_sweep(**spec: Any) -> FineTuneSweep:
    """A grid over three learning rates, two at a time (the template's storage is elsewhere on purpose)."""
    return FineTuneSweep.model_validate(
        {
            "metadata": {"name": "lr", "namespace": "default", "uid": "sweep-uid"},
            "spec": {
                "template": {
                    "spec": {
                        "model": {
                            "source": "pvc://m/minilm",
                            "task": "sequence-classification",
                            "numLabels": 2,
                        },
                        "dataset": {"source": "pvc://d/s.jsonl", "validationSplit": 0.2},
                        "output": {"storage": "pvc://results/elsewhere"},
                    }
                },
                "parameters": [{"name": "learningRate", "type": "float", "values": RATES}],
                "algorithm": {"type": "grid"},
                "objective": {"metric": "evalLoss", "goal": "minimize"},
                "maxTrials": 3,
                "parallelTrials": 2,
                **spec,
            },
        }
    )


class FakeTrial:
    """A trial's `tauon run --local`: running until the test ends it (or it is stopped)."""

    def __init__(self, manifest: Path, output: Path, log: Path):
        self.manifest = json.loads(manifest.read_text())
        self.output = output
        self.log = log
        self.returncode: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True
        self.returncode = 143
        self.write({"phase": "Failed", "conditions": [failed("Interrupted")]})

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode

    def write(self, status: dict[str, Any]) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "status.json").write_text(json.dumps(status))

    def succeed(self, eval_loss: float) -> None:
        model = f"file://{self.output}/model"
        self.write(
            {
                "phase": "Succeeded",
                "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded"}],
                "progress": {"step": 10, "totalSteps": 10},
                "output": {"model": model, "metrics": {"evalLoss": eval_loss}},
            }
        )
        self.returncode = 0


def failed(reason: str, message: str = "") -> dict[str, Any]:
    return {"type": "Failed", "status": "True", "reason": reason, "message": message}


class Launcher:
    def __init__(self) -> None:
        self.started: list[FakeTrial] = []

    def __call__(self, manifest: Path, output: Path, log: Path) -> FakeTrial:
        trial = FakeTrial(manifest, output, log)
        self.started.append(trial)
        return trial

    def by_name(self) -> dict[str, FakeTrial]:
        return {t.manifest["metadata"]["name"]: t for t in self.started}


def status_json(out: Path) -> FineTuneSweepStatus:
    return FineTuneSweepStatus.model_validate(json.loads((out / "status.json").read_text()))


def start(tmp_path: Path, **spec: Any) -> tuple[ls.SweepRun, Launcher, Path]:
    launcher = Launcher()
    out = tmp_path / "lr"
    run = ls.SweepRun(make_sweep(**spec), out, launcher)
    run.resume()
    return run, launcher, out


def test_creates_start_trial_runs_in_the_sweep_directory(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    st = run.step(T0)
    assert [t.manifest["metadata"]["name"] for t in launcher.started] == ["lr-t0", "lr-t1"]  # parallelTrials
    t0 = launcher.started[0]
    # the FineTuneJob the planner created, as a cluster would hold it, its output in <DIR>/<trial>
    meta = t0.manifest["metadata"]
    assert meta["labels"][LABEL_SWEEP] == "lr" and meta["labels"][LABEL_TRIAL] == "0"
    assert json.loads(meta["annotations"][ANN_TRIAL_PARAMETERS]) == {"learningRate": 1e-4}
    assert t0.manifest["spec"]["hyperparameters"]["learningRate"] == 1e-4
    assert t0.manifest["spec"]["output"]["storage"] == f"file://{out}/lr-t0"
    assert t0.output == out / "lr-t0" and t0.log == out / ".sweep" / "logs" / "lr-t0.log"
    # status.json is the sweep's status as the planner made it
    assert status_json(out) == st and st.phase == "Running"
    assert [(t.name, t.phase) for t in st.trials] == [("lr-t0", "Pending"), ("lr-t1", "Pending")]
    assert run.step(T0) == st and len(launcher.started) == 2  # converged: nothing new


def test_finished_trials_free_slots_and_the_best_is_reported(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    run.step(T0)
    trials = launcher.by_name()
    trials["lr-t1"].write({"phase": "Running", "progress": {"step": 4, "totalSteps": 10}})
    trials["lr-t0"].succeed(0.7)
    st = run.step(T0 + timedelta(seconds=1))
    assert [t.manifest["metadata"]["name"] for t in launcher.started] == ["lr-t0", "lr-t1", "lr-t2"]
    assert [(t.phase, t.step) for t in st.trials] == [("Succeeded", 10), ("Running", 4), ("Pending", None)]
    launcher.by_name()["lr-t1"].succeed(0.4)
    launcher.by_name()["lr-t2"].succeed(0.9)
    st = run.step(T0 + timedelta(seconds=2))
    assert st.phase == "Succeeded" and status_json(out) == st and not run.running()
    assert st.best is not None and (st.best.trial, st.best.objective) == ("lr-t1", 0.4)
    assert st.best.model == f"file://{out}/lr-t1/model" and st.best.parameters == {"learningRate": 1e-3}
    rows = ls.trial_rows(st, {t.name: run.trial_status(t.name) for t in st.trials}, "evalLoss")
    assert rows[1] == ["lr-t1", "learningRate=0.001", "Succeeded", "10/10", "0.4"]


def test_a_run_that_ends_without_a_final_status_fails_its_trial(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    run.step(T0)
    t0 = launcher.started[0]
    t0.log.parent.mkdir(parents=True, exist_ok=True)
    t0.log.write_text("Traceback ...\nImportError: no module\n")
    t0.returncode = 1  # crashed: status.json never written
    st = run.step(T0)
    assert st.trials[0].phase == "Failed"
    assert st.trials[0].message is not None and st.trials[0].message.startswith("LocalRunFailed: ")
    assert "ImportError: no module" in st.trials[0].message
    written = json.loads((out / "lr-t0" / "status.json").read_text())  # resumes read it back
    assert ls.trial_state(written) == "finished"


def test_interrupt_stops_every_trial_and_a_rerun_resumes(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    run.step(T0)
    launcher.by_name()["lr-t0"].succeed(0.5)
    run.step(T0)  # t0 finished, t2 started
    run.interrupt(T0)
    assert all(t.terminated for t in launcher.started if t.manifest["metadata"]["name"] != "lr-t0")
    st = status_json(out)
    failed_cond = next(c for c in st.conditions if c.type == "Failed")
    assert st.phase == "Failed" and (failed_cond.status, failed_cond.reason) == ("True", "Interrupted")
    assert [t.phase for t in st.trials] == ["Succeeded", "Failed", "Failed"]
    assert st.trials[1].message is not None and st.trials[1].message.startswith("Interrupted")

    # the same command again: t0 is read back (not re-run), the interrupted trials run again
    again = Launcher()
    run2 = ls.SweepRun(make_sweep(), out, again)
    run2.resume()
    assert sorted(t.manifest["metadata"]["name"] for t in again.started) == ["lr-t1", "lr-t2"]
    assert not (out / "lr-t1" / "status.json").exists()  # the interrupted run's status is not this one's
    st = run2.step(T0 + timedelta(seconds=5))
    assert st.phase == "Running" and all(c.reason != "Interrupted" for c in st.conditions)
    assert [(t.name, t.phase) for t in st.trials] == [
        ("lr-t0", "Succeeded"),
        ("lr-t1", "Pending"),
        ("lr-t2", "Pending"),
    ]
    for name, loss in (("lr-t1", 0.3), ("lr-t2", 0.6)):
        again.by_name()[name].succeed(loss)
    st = run2.step(T0 + timedelta(seconds=6))
    assert st.phase == "Succeeded" and st.best is not None and st.best.trial == "lr-t1"
    assert len(again.started) == 2  # nothing else ran


def test_a_finished_sweep_resumes_to_itself(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path, maxTrials=2)
    run.step(T0)
    for name, loss in (("lr-t0", 0.3), ("lr-t1", 0.6)):
        launcher.by_name()[name].succeed(loss)
    done = run.step(T0)
    again = Launcher()
    assert ls.run_sweep(make_sweep(maxTrials=2), out, quiet=True, launch=again, poll=0) == 0
    assert again.started == [] and status_json(out) == done


def test_resume_refuses_another_search_space_or_another_sweep(tmp_path: Path) -> None:
    run, _, out = start(tmp_path)
    run.step(T0)
    other = make_sweep(parameters=[{"name": "learningRate", "type": "float", "values": [0.5, 0.1]}])
    with pytest.raises(ls.SweepMismatch, match="another spec.parameters"):
        ls.SweepRun(other, out, Launcher()).resume()
    renamed = make_sweep()
    renamed.metadata.name = "other"
    with pytest.raises(ls.SweepMismatch, match="holds FineTuneSweep 'lr'"):
        ls.SweepRun(renamed, out, Launcher()).resume()
    # a changed maxTrials (mutable on a cluster too) resumes
    ls.SweepRun(make_sweep(maxTrials=2), out, Launcher()).resume()


def test_a_prune_patch_annotates_the_trial_and_writes_its_prune_file(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    run.step(T0)
    plan = Plan()
    patch = {"metadata": {"annotations": {ANN_PRUNE: "median: evalLoss 0.9 at step 4 is worse"}}}
    plan.patches.append((FINETUNEJOB, "lr-t1", patch))
    plan.patches.append((FINETUNEJOB, "lr-t9", patch))  # gone: ignored, as a 404 would be
    run.execute(plan)
    assert (out / "lr-t1" / "prune").read_text() == "median: evalLoss 0.9 at step 4 is worse\n"
    assert prune_message(out / "lr-t1") == "median: evalLoss 0.9 at step 4 is worse"
    assert not (out / "lr-t0" / "prune").exists()
    saved = json.loads((out / ".sweep" / "trials" / "lr-t1.json").read_text())
    assert saved["metadata"]["annotations"][ANN_PRUNE].startswith("median")
    assert ANN_TRIAL_PARAMETERS in saved["metadata"]["annotations"]  # a merge patch keeps the rest
    # the next pass observes the annotation on the trial, as the cluster would show it
    observed = ls.observed_trial(run.trials["lr-t1"].manifest, None)
    assert observed["metadata"]["annotations"][ANN_PRUNE].startswith("median")
    assert not launcher.by_name()["lr-t1"].terminated  # its own run stops itself


def test_a_delete_stops_the_trial_and_forgets_it(tmp_path: Path) -> None:
    run, launcher, out = start(tmp_path)
    run.step(T0)
    run.execute(Plan(deletes=[(FINETUNEJOB, "lr-t1")]))
    assert launcher.by_name()["lr-t1"].terminated and not launcher.by_name()["lr-t0"].terminated
    assert "lr-t1" not in run.trials and not (out / ".sweep" / "trials" / "lr-t1.json").exists()


def test_ctrl_c_during_run_sweep_leaves_a_resumable_status(tmp_path: Path) -> None:
    launched: list[FakeTrial] = []

    def launch(manifest: Path, output: Path, log: Path) -> FakeTrial:
        trial = FakeTrial(manifest, output, log)
        launched.append(trial)
        if len(launched) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the sweep runs
        return trial

    out = tmp_path / "lr"
    assert ls.run_sweep(make_sweep(), out, quiet=True, launch=launch, poll=0) == 130
    assert all(t.terminated for t in launched) and len(launched) == 2
    st = status_json(out)
    assert st.phase == "Failed" and any(c.reason == "Interrupted" for c in st.conditions)
    resumed = ls.resume_status(st.dump())  # what a rerun starts from: the conditions of its next pass
    assert resumed.phase == "Pending" and resumed.conditions == [] and len(resumed.trials) == 2


def test_pure_helpers() -> None:
    assert ls.trial_state(None) == "unfinished"
    assert ls.trial_state({"phase": "Running"}) == "unfinished"
    assert ls.trial_state({"phase": "Succeeded"}) == "finished"
    assert ls.trial_state({"phase": "Failed", "conditions": [failed("PermanentError")]}) == "finished"
    assert ls.trial_state({"phase": "Failed", "conditions": [failed("Pruned")]}) == "finished"
    assert ls.trial_state({"phase": "Failed", "conditions": [failed("Interrupted")]}) == "interrupted"
    assert ls.merge_patch({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None, "e": 4}}) == {
        "a": {"c": 2, "e": 4},
        "d": 3,
    }
    evals = {
        "progress": {"loss": 0.5, "evaluations": [{"step": 2, "evalLoss": 0.9}, {"step": 4, "evalLoss": 0.7}]}
    }
    assert ls.intermediate(evals, "evalLoss") == 0.7 and ls.intermediate(evals, "trainLoss") == 0.5
    assert ls.intermediate(evals, "evalAccuracy") is None and ls.intermediate(None, "evalLoss") is None
    ended = ls.ended_status(1, "a\nb\nc\nd\n", T0)
    assert ended["phase"] == "Failed" and ended["conditions"][0]["reason"] == "LocalRunFailed"
    assert ended["conditions"][0]["message"] == "tauon run --local exited with code 1: b | c | d"
    assert ls.resume_status(None) == FineTuneSweepStatus()
    assert (
        ls.resume_status(
            {
                "phase": "Succeeded",
                "conditions": [{"type": "Succeeded", "status": "True", "reason": "AllTrialsFinished"}],
            }
        ).phase
        == "Succeeded"
    )


# -- a pruned local FineTuneJob run (tauon.local.run) ------------------------------------------------------


def trial_job(tmp_path: Path) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "metadata": {"name": "lr-t1", "namespace": "default", "uid": "u1"},
            "spec": {
                "model": {
                    "source": f"file://{tmp_path}/m",
                    "task": "sequence-classification",
                    "numLabels": 2,
                },
                "dataset": {"source": f"file://{tmp_path}/d.jsonl"},
                "output": {"storage": f"file://{tmp_path}/out"},
            },
        }
    )


def test_job_status_prune_ends_failed_pruned(tmp_path: Path) -> None:
    status = JobStatus(trial_job(tmp_path), tmp_path / "out", OperatorConfig(allow_host_paths=True))
    status.observe([])
    status.prune("median rule", [])
    st = status.status
    failed_cond = next(c for c in st.conditions if c.type == "Failed")
    assert st.phase == "Failed" and (failed_cond.status, failed_cond.reason) == ("True", "Pruned")
    assert failed_cond.message == "pruned by its FineTuneSweep: median rule"
    assert json.loads((tmp_path / "out" / "status.json").read_text()) == st.dump()


def test_a_run_pruned_before_it_starts_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "prune").write_text("asha: below rung 0\n")
    assert run_finetunejob(trial_job(tmp_path), out, quiet=True) == EXIT_PRUNED
    status = json.loads((out / "status.json").read_text())
    assert status["phase"] == "Failed" and not (out / "logs").exists()
    cond = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "Pruned" and cond["message"] == "pruned by its FineTuneSweep: asha: below rung 0"
    assert prune_message(tmp_path) is None


def test_fine_tune_sweep_ref_serves_the_best_trial_of_the_local_sweep(tmp_path: Path) -> None:
    from tauon.api.inferenceservice import InferenceService
    from tauon.local.process import Unsupported
    from tauon.local.run import prepare_server, write_status

    runs = tmp_path / "runs"
    model = runs / "lr" / "lr-t1" / "model"
    model.mkdir(parents=True)
    svc = InferenceService.model_validate(
        {
            "metadata": {"name": "best", "namespace": "default"},
            "spec": {"model": {"fineTuneSweepRef": {"name": "lr"}}},
        }
    )
    with pytest.raises(Unsupported, match="run the FineTuneSweep lr locally first"):
        prepare_server(svc, runs, None)
    sweep = make_sweep()
    write_status(runs / "lr" / ".sweep" / "sweep.json", sweep.model_dump(by_alias=True, mode="json"))
    done = {
        "phase": "Succeeded",
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "AllTrialsFinished"}],
        "best": {"trial": "lr-t1", "objective": 0.4, "model": f"file://{model}"},
    }
    write_status(runs / "lr" / "status.json", done)
    prep = prepare_server(svc, runs, None)
    assert prep.argv[prep.argv.index("--model") + 1] == str(model)


def test_a_trial_stops_when_its_sweep_process_is_gone() -> None:
    """A trial started by a local sweep carries the sweep's pid; once its parent is another process (the
    sweep was SIGKILLed and the trial re-parented), it stops its ranks."""
    from tauon.local.run import SWEEP_PID_ENV, orphaned

    assert orphaned({}, 1) is None  # not a sweep's trial
    assert orphaned({SWEEP_PID_ENV: "4242"}, 4242) is None  # its sweep is alive
    gone = orphaned({SWEEP_PID_ENV: "4242"}, 1)
    assert gone is not None and "pid 4242" in gone
    assert orphaned({SWEEP_PID_ENV: "not-a-pid"}, 1) is None


def test_launch_trial_passes_the_sweep_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    from tauon.local import sweep as sw

    script = tmp_path / "env.py"
    script.write_text("import os; print(os.environ['TAUON_SWEEP_PID'], os.getppid())")
    real = subprocess.Popen
    argv_seen: list[list[str]] = []

    def popen(argv: list[str], **kw: object) -> object:  # the real launcher, the trial swapped for the script
        argv_seen.append(argv)
        return real([sys.executable, str(script)], **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(sw.subprocess, "Popen", popen)
    p = sw.launch_trial(tmp_path / "t.yaml", tmp_path / "out", tmp_path / "log.txt")
    p.wait(timeout=30)
    pid, ppid = (tmp_path / "log.txt").read_text().split()
    assert pid == ppid == str(os.getpid())
    assert argv_seen[0][1:4] == ["-m", "tauon.cli", "run"]
