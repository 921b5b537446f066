"""`edge-m2kd demo` end to end on digits, with a shortened schedule: the JSON it promises, the
workspace it leaves, and M2KD far above fine-tuning and not below LwF with equal seeds."""

import json

from click.testing import CliRunner

from edge_m2kd.cli import main
from edge_m2kd.workspace import Workspace

EPOCHS = "4"


def demo(method: str, workdir) -> dict:
    result = CliRunner().invoke(main, ["demo", "--method", method, "--epochs", EPOCHS, "--workdir", str(workdir),
                                       "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_demo_json_workspace_and_method_ranking(tmp_path):
    results = {m: demo(m, tmp_path / m) for m in ("finetune", "lwf", "m2kd")}
    m2kd = results["m2kd"]
    assert {"method", "steps", "final_accuracy", "average_incremental_accuracy", "forgetting", "seconds"} <= m2kd.keys()
    assert [s["step"] for s in m2kd["steps"]] == [1, 2, 3, 4, 5]
    assert all({"classes", "accuracy", "nme_accuracy", "accuracy_per_group"} <= s.keys() for s in m2kd["steps"])
    assert [len(s["accuracy_per_group"]) for s in m2kd["steps"]] == [1, 2, 3, 4, 5]
    assert m2kd["final_accuracy"] >= results["finetune"]["final_accuracy"] + 0.20, results
    assert m2kd["final_accuracy"] >= results["lwf"]["final_accuracy"], results
    ws = Workspace.open(tmp_path / "m2kd" / "workspace")
    assert ws.steps == 5 and all(r.ok for r in ws.load_learner().store.verify())
