"""`edge-m2kd serve`: every endpoint and every refusal, through FastAPI's test client, on tiny
digits workspaces (ResNet-20 at 16 px, 2 epochs). Steps run as real `add-classes` processes."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from edge_m2kd.classnames import check_class_name
from edge_m2kd.cli import main
from edge_m2kd.data import load_digits
from edge_m2kd.errors import UserError
from edge_m2kd.server import ServerSettings, create_app
from edge_m2kd.server.jobs import FINISHED
from edge_m2kd.server.uploads import UploadLimits
from edge_m2kd.workspace import Workspace

PORT = 8765
TOKEN = "test-token-0123456789abcdef"
INIT = ["--backbone", "resnet20", "--input-size", "16", "--exemplars", "40", "--epochs", "2",
        "--batch-size", "32", "--planned-steps", "4", "--device", "cpu", "--no-flip"]


def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits() -> dict[str, list[bytes]]:
    """PNG bytes of 24 training digits per class, 0-4."""
    data = load_digits("train", size=16)
    return {name: [png(img) for img in data.images[data.labels == c][:24]] for c, name in enumerate(data.class_names[:5])}


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory, digits) -> Path:
    """A workspace that has learned 0 and 1 (one step), made through the CLI."""
    root = tmp_path_factory.mktemp("serve")
    for name in ("0", "1"):
        (root / "data" / name).mkdir(parents=True)
        for i, data in enumerate(digits[name]):
            (root / "data" / name / f"{i:03d}.png").write_bytes(data)
    ws = root / "ws"
    assert cli("init", ws, *INIT)[0] == 0
    code, _, err = cli("add-classes", ws, root / "data")
    assert code == 0, err
    return ws


@pytest.fixture
def ws(base_ws, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(base_ws, copy)
    return copy


AUTH = {"X-Edge-Token": TOKEN}


def client(ws: Path, host: str = "127.0.0.1", **limits) -> TestClient:
    """A client that sends the token, as the page does once it has it."""
    settings = ServerSettings(workspace=ws, host=host, port=PORT, token=TOKEN, limits=UploadLimits(**limits))
    shown = "127.0.0.1" if host == "127.0.0.1" else "192.0.2.7"
    return TestClient(create_app(settings), base_url=f"http://{shown}:{PORT}", headers=AUTH)


def tokenless(c: TestClient) -> TestClient:
    """The same server, asked by someone without the token (another user of the machine)."""
    return TestClient(c.app, base_url=str(c.base_url))


def step_form(per_class: dict[str, list[bytes]], epochs: int | None = None) -> tuple[dict, list]:
    data: dict = {"class": list(per_class)}
    if epochs is not None:
        data["epochs"] = str(epochs)
    files = [(f"images-{i}", (f"{name}-{k}.png", blob, "image/png"))
             for i, (name, blobs) in enumerate(per_class.items()) for k, blob in enumerate(blobs)]
    return data, files


def wait_job(c: TestClient, job_id: str, until=lambda j: j["status"] in FINISHED,
             timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job never got there: {job}")


def predict(c: TestClient, blobs: list[bytes]) -> dict:
    r = c.post("/api/predict", data={"top_k": "2"},
               files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    return r.json()


# -- reports: the CLI's --json, word for word ---------------------------------------------------------------
def test_overview_reports_are_the_clis_json(base_ws):
    with client(base_ws) as c:
        page = c.get("/")
        assert page.status_code == 200 and TOKEN not in page.text  # on loopback too: the user brings it
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        for asset in ("/static/app.js", "/static/style.css"):
            assert c.get(asset).status_code == 200
        ws = c.get("/api/workspace").json()
        assert [cl["name"] for cl in ws["classes"]] == ["0", "1"] and ws["steps"] == 1 and ws["job"] is None
        for endpoint, command in (("/api/history", ["history"]), ("/api/snapshots?verify=true", ["snapshots", "--verify"])):
            code, out, _ = cli(*command, base_ws, "--json")
            assert code == 0 and c.get(endpoint).json() == json.loads(out)
        memory = c.get("/api/memory").json()
        code, out, _ = cli("memory", base_ws, "--json")
        expected = json.loads(out)
        assert memory.keys() == expected.keys()
        # The predicted peak counts the asking process's own resident memory; the stored bytes are exact.
        for key in ("weights", "snapshots", "snapshots_total", "exemplars", "exported_engine", "stored_total", "budget"):
            assert memory[key] == expected[key], key
        thumb = c.get("/api/classes/1/thumbnail.png")
        assert thumb.headers["content-type"] == "image/png" and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
        assert c.get("/api/classes/9/thumbnail.png").status_code == 404
        plot = c.get("/api/history.png")
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
        assert c.get("/api/jobs/current").json() is None and c.get("/api/jobs/nope").status_code == 404


# -- who may call -----------------------------------------------------------------------------------------------------
def test_on_loopback_too_every_api_call_needs_the_token(base_ws, digits):
    with client(base_ws) as c:
        bare = tokenless(c)
        assert c.get("/api/workspace").status_code == 200
        data, files = step_form({"5": digits["2"][:2]})
        for headers in ({}, {"X-Edge-Token": "wrong-token-wrong-token"}):
            for path in ("/api/steps", "/api/predict", "/api/export", "/api/jobs/x/cancel"):
                r = bare.post(path, headers=headers, data=data, files=files)
                assert r.status_code == 401 and "token" in r.json()["detail"], (path, r.text)
            for path in ("/api/workspace", "/api/memory", "/api/classes/0/thumbnail.png"):
                assert bare.get(path, headers=headers).status_code == 401, path
        assert c.get("/api/workspace", headers={"X-Edge-Token": "wrong"}).status_code == 401
        # another site's page: its Origin is refused even with a token it could not have
        r = c.post("/api/export", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        # DNS rebinding: a foreign name resolved to 127.0.0.1 is not this server's name
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 400
        assert c.get("/api/workspace", headers={"Host": f"localhost:{PORT}"}).status_code == 200
    assert not (base_ws / "staging").exists() or not any((base_ws / "staging").iterdir())


def test_a_non_loopback_bind_needs_the_token_on_every_api_call(base_ws):
    with client(base_ws, host="0.0.0.0") as c:
        bare = tokenless(c)
        page = bare.get("/")
        assert page.status_code == 200 and TOKEN not in page.text  # the user brings it
        paths = {route.path.replace("{class_id}", "0").replace("{job_id}", "x"): sorted(route.methods)[0]
                 for route in c.app.routes if getattr(route, "path", "").startswith("/api/")}
        assert len(paths) >= 11
        for path, method in [*paths.items(), ("/api/no-such-thing", "GET")]:
            for headers in ({}, {"X-Edge-Token": TOKEN[:-1] + "x"}):
                r = bare.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, r.status_code)
        assert c.get("/api/workspace").status_code == 200
        assert c.get("/api/classes/0/thumbnail.png").status_code == 200


def test_serve_refuses_a_weak_token_file(tmp_path, base_ws):
    weak = tmp_path / "token"
    weak.write_text("short\n")
    weak.chmod(0o600)
    code, _, err = cli("serve", base_ws, "--token-file", weak)
    assert code == 2 and err.startswith("error: the token in") and len(err.strip().splitlines()) == 1
    code, _, err = cli("serve", tmp_path / "nothing-here")
    assert code == 2 and "is not a workspace" in err


# -- what a client may send -------------------------------------------------------------------------------------------
def test_uploads_are_refused_unless_named_and_sized_right_and_images(ws, digits, monkeypatch):
    noise = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))  # ~12 KB
    with client(ws, max_file_bytes=8000, max_files=6, max_request_bytes=40_000) as c:
        def post(per_class, **kw):
            data, files = step_form(per_class)
            return c.post("/api/steps", data=data, files=files, **kw)

        cases = [
            ({"5": [b"this is not an image"]}, 400, "is not an image"),
            ({"5": [noise]}, 413, "larger than the limit"),
            ({"5": digits["2"][:7]}, 413, "Too many files"),
            ({"../evil": digits["2"][:2]}, 400, "path separator or '..'"),
            ({"a/b": digits["2"][:2]}, 400, "path separator"),
            ({"bell\x07": digits["2"][:2]}, 400, "control or invisible character"),
            ({"x" * 65: digits["2"][:2]}, 400, "use at most 64"),
            ({"5": []}, 400, "has no images"),
            ({}, 400, "no class named"),
        ]
        for per_class, status, text in cases:
            r = post(per_class)
            assert r.status_code == status and text in r.json()["detail"], (per_class.keys(), r.text)
        # the whole request is capped while it streams, whatever Content-Length says
        r = post({"5": digits["2"][:4] + [b"\0" * 7000] * 2})
        assert r.status_code in (400, 413)
        big = [b"\0" * 7900] * 6
        r = post({"5": big})
        assert r.status_code == 413 and "request is larger" in r.json()["detail"]
        # a decompression bomb: more pixels than PIL's limit, refused from the header alone
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        with pytest.warns(Image.DecompressionBombWarning):  # PIL's own check is on, and warns first
            r = post({"5": [png(np.zeros((40, 40, 3), np.uint8))]})
        assert r.status_code == 413 and "40x40 pixels" in r.json()["detail"], r.text
        r = c.post("/api/predict", files=[("images", ("x.png", b"GIF89a nope", "image/png"))])
        monkeypatch.undo()
        assert r.status_code == 400 and "'x.png' is not an image" in r.json()["detail"]
        assert c.post("/api/steps", data={"class": "5", "epochs": "0"}).status_code == 400
    assert not (ws.parent / "evil").exists()
    assert not any((ws / "staging").iterdir())  # every refused upload was removed
    assert Workspace.open(ws).steps == 1


def test_one_class_name_rule_for_the_cli_and_the_server(tmp_path, ws, digits):
    for good in ("cat", "0", "traffic light", "Käfer", "a.b"):
        assert check_class_name(good) == good
    for bad in ("", "..", "../x", "a\\b", "a\nb", "\u200bcat", ".hidden", " cat", "a,b", "x" * 65):
        with pytest.raises(UserError):
            check_class_name(bad)
    folder = tmp_path / "data" / "a,b"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(digits["2"][0])
    code, _, err = cli("add-classes", ws, tmp_path / "data")
    assert code == 2 and "contains a comma" in err


# -- teaching: a step in its own process ----------------------------------------------------------------------------------
def test_a_known_class_is_refused_with_the_clis_line(ws, digits, tmp_path):
    (tmp_path / "again" / "1").mkdir(parents=True)
    (tmp_path / "again" / "1" / "0.png").write_bytes(digits["1"][0])
    code, _, err = cli("add-classes", ws, tmp_path / "again", "--classes", "1")
    assert code == 2
    with client(ws) as c:
        data, files = step_form({"1": digits["1"][:3]})
        r = c.post("/api/steps", data=data, files=files)
        assert r.status_code == 202
        job = wait_job(c, r.json()["id"])
    assert job["status"] == "refused" and f"error: {job['reason']}" == err.strip()
    assert not any((ws / "staging").iterdir())


def test_a_step_from_the_page_streams_its_progress_and_commits(ws, digits):
    with client(ws) as c:
        before = predict(c, digits["2"][:2])
        assert before["backend"] == "torch" and before["steps"] == 1  # no export yet: the workspace's model
        data, files = step_form({"2": digits["2"], "3": digits["3"]})
        r = c.post("/api/steps", data=data, files=files)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["classes"] == ["2", "3"] and job["images"] == 48
        events = []
        with c.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        final = events[-1]
        assert final["status"] == "done", final
        epochs = [(e["phase"], e["epoch"]) for e in events if e["epoch"]]
        # The stream sends the job's state as it polls it, so a fast epoch can be passed over;
        # what it must show is the training under way, then the end.
        assert any(p == "train" for p, _ in epochs) and any(p == "finishing" for p, _ in epochs)
        assert any(e["time_left"] is not None and e["images_per_second"] for e in events)
        assert final["result"]["step"] == 2 and final["result"]["classes"] == ["2", "3"]
        assert [cl["name"] for cl in c.get("/api/workspace").json()["classes"]] == ["0", "1", "2", "3"]
        after = predict(c, digits["2"][:2])  # the predictor follows the commit
        assert after["steps"] == 2 and after["generation"] != before["generation"]
        assert {p["class"] for r in after["results"] for p in r["predictions"]} <= {"0", "1", "2", "3"}
        assert len(c.get("/api/history").json()["steps"]) == 2
    assert not any((ws / "staging").iterdir())


def test_predictions_during_a_step_answer_from_the_last_commit_and_a_cancel_changes_nothing(ws, digits):
    before_sum = Workspace.open(ws).checksum()
    with client(ws) as c:
        before = predict(c, digits["0"][:3] + digits["2"][:1])
        data, files = step_form({"2": digits["2"]}, epochs=200)
        job = c.post("/api/steps", data=data, files=files).json()
        # "starting" comes before "running": under load the first poll can still see it (failed once in CI).
        running = wait_job(c, job["id"], until=lambda j: j["phase"] == "train" or j["status"] in FINISHED)
        assert running["status"] == "running", running
        during = predict(c, digits["0"][:3] + digits["2"][:1])
        with client(ws) as fresh:  # a server that loads the model now, from the files, mid-step
            loaded_during = predict(fresh, digits["0"][:3] + digits["2"][:1])
        assert c.get(f"/api/jobs/{job['id']}").json()["status"] == "running"  # both answered mid-step
        for answer in (during, loaded_during):
            assert {k: v for k, v in answer.items() if k != "inference_ms"} == \
                   {k: v for k, v in before.items() if k != "inference_ms"}
        # a second step, or an export, while this one runs: the lock's line, naming the holder
        data, files = step_form({"4": digits["4"][:2]})
        second = c.post("/api/steps", data=data, files=files)
        detail = second.json()["detail"]
        assert second.status_code == 409 and f"(pid {running['pid']})" in detail and "`add-classes`" in detail
        export = c.post("/api/export", json={})
        assert export.status_code == 409 and export.json()["detail"] == detail
        cancelled = c.post(f"/api/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        final = wait_job(c, job["id"])
        assert final["status"] == "cancelled"
    assert Workspace.open(ws).checksum() == before_sum
    with Workspace.writing(ws, "test"):  # the lock died with the step
        pass
    assert not any((ws / "staging").iterdir())


# -- export ----------------------------------------------------------------------------------------------------------------------
def test_export_reports_parity_and_paths_and_predictions_move_to_onnxruntime(ws, digits):
    with client(ws) as c:
        r = c.post("/api/export", json={})
        assert r.status_code == 200, r.text
        out = r.json()
        assert Path(out["onnx"]).is_file() and Path(out["metadata"]).is_file() and out["tensorrt"] is None
        assert out["parity"]["passed"] and out["parity"]["top1_agreement"] == 1.0
        answer = predict(c, digits["1"][:2])
        assert answer["backend"] == "onnxruntime" and any(s.startswith("tensorrt:") for s in answer["passed_over"])
        assert c.get("/api/memory").json()["exported_engine"] > 0
        r = c.post("/api/export", json={"tensorrt": True})
        assert r.status_code == 400 and "TensorRT" in r.json()["detail"] and "\n" not in r.json()["detail"]
