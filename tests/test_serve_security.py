"""Issue 32's findings on `serve`, one test each (each failed before its fix): the loopback token
a local user could take from the page, large images decoded in parallel, sockets that never
finish their headers, missing headers, weak token files, class names that look alike, and work
done before a refusal.

Run as a script, it measures the server's peak memory under parallel uploads of large images
(README, "serve"): `python tests/test_serve_security.py WS [N]`, against whichever edge_m2kd
`python -m edge_m2kd` imports (PYTHONPATH=an older tree measures that one).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

import test_serve  # noqa: E402
from test_serve import TOKEN, cli, client, png, step_form, tokenless  # noqa: E402

from edge_m2kd.classnames import check_class_name, check_new_class_name  # noqa: E402
from edge_m2kd.errors import UserError  # noqa: E402
from edge_m2kd.server import ServerSettings, create_app  # noqa: E402
from edge_m2kd.server.jobs import JobState  # noqa: E402
from edge_m2kd.server.security import read_token_file, token_bits  # noqa: E402

# test_serve's workspaces: the one that has learned 0 and 1, built once for this module too
base_ws, digits = test_serve.base_ws, test_serve.digits
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


# -- helpers: a real server, large images, memory -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(width: int, height: int) -> bytes:
    """An RGB PNG of width x height black pixels, written row by row (never held decoded here):
    9400 x 9400 is 88 megapixels, just under Pillow's limit, in about 260 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter byte, then the pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def gradient_png(side: int) -> bytes:
    """A side x side RGB PNG that really costs its pixels to decode (not flat)."""
    y, x = np.indices((side, side))
    img = np.stack([(x * 255 // side), (y * 255 // side), ((x ^ y) & 255)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM again from the current RSS (Linux 4.0+: `5` to clear_refs), so that what follows
    is measured alone."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def post_images(port: int, token: str, path: str, blobs: list[bytes]) -> int:
    boundary = "edge-m2kd-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n" for i, blob in enumerate(blobs))
    body += f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          "X-Edge-Token": token, "Host": f"127.0.0.1:{port}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def parallel_upload_peak(pid: int, port: int, token: str, blob: bytes, n: int) -> tuple[int, list[int]]:
    """The server's peak RSS rise (bytes) while n clients each send `blob` to /api/predict at once,
    and the statuses they got."""
    # Past the server's warm-up (views.warm: the reports, in this order, then a prediction), which
    # would otherwise be measured too: each of these waits for the warm-up's own computation.
    for path in ("/api/history", "/api/memory", "/api/snapshots", "/api/history.png", "/api/classes/0/thumbnail.png"):
        get(port, path, token)
    post_images(port, token, "/api/predict", [png(np.zeros((16, 16, 3), np.uint8))])
    if not reset_peak_rss(pid):
        pytest.skip("this kernel cannot reset a process's peak RSS")
    before = Path(f"/proc/{pid}/status").read_text()
    base = int(re.search(r"VmRSS:\s+(\d+) kB", before).group(1)) * 1024
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda _: post_images(port, token, "/api/predict", [blob]), range(n)))
    return peak_rss(pid) - base, statuses


@contextmanager
def serve_process(ws: Path, *args: str, tree: Path | None = None):
    """`edge-m2kd serve WS` as the user starts it (from the source tree `tree` if given): the
    process, its port, the token (from the printed URL; before issue 32, from the page), the
    printed line and the page."""
    port = free_port()
    env = {**os.environ, **({"PYTHONPATH": str(tree)} if tree else {})}
    proc = subprocess.Popen([sys.executable, "-m", "edge_m2kd", "serve", str(ws), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, line + proc.communicate()[0]
            try:
                page = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                page.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
                html = page.getresponse().read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "serve never answered"
                time.sleep(0.2)
        found = re.search(r"#token=([A-Za-z0-9_-]+)", line) or re.search(r'name="edge-token" content="([^"]+)"', html)
        yield proc, port, found.group(1) if found else None, line, html
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def uvicorn_thread(settings: ServerSettings):
    """The server as `serve` configures uvicorn (connections.py), in a thread of this process."""
    import uvicorn

    from edge_m2kd.server.connections import uvicorn_config

    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn never started"
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(30)


def get(port: int, path: str, token: str | None = TOKEN) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}", **({"X-Edge-Token": token} if token else {})})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# -- 1. the token: nothing a tokenless request reads carries it, and every /api/ call needs it ---------------------
def test_another_local_user_cannot_take_the_token_from_the_loopback_page(base_ws, digits):
    with serve_process(base_ws) as (proc, port, token, line, html):
        # printed once, in the URL's #fragment, on loopback too
        assert token and f"http://127.0.0.1:{port}/#token={token}" in line, line
        assert token not in html and "edge-token" not in html
        for asset in ("/static/app.js", "/static/style.css", "/static/index.html", "/nothing-here"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", asset, headers={"Host": f"127.0.0.1:{port}"})
            assert token not in conn.getresponse().read().decode(errors="replace"), asset
        # what the other uid did next: teach a class without the token. Refused, and the workspace unchanged.
        before = json.loads((base_ws / "workspace.json").read_text())
        assert post_images(port, "", "/api/steps", [digits["2"][0]]) == 401
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/api/steps", b"class=5", {"Host": f"127.0.0.1:{port}",
                                                       "Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 401
        for path in ("/api/workspace", "/api/history", "/api/memory", "/api/snapshots", "/api/classes/0/thumbnail.png",
                     "/api/history.png", "/api/jobs/current"):
            assert get(port, path, token=None) == 401, path  # reports show the device's images: token too
        assert get(port, "/api/workspace", token=token) == 200
        assert json.loads((base_ws / "workspace.json").read_text()) == before


def test_every_api_route_refuses_a_tokenless_call_on_loopback(base_ws):
    with client(base_ws) as c:
        bare = tokenless(c)
        paths = {route.path.replace("{class_id}", "0").replace("{job_id}", "x"): sorted(route.methods)[0]
                 for route in c.app.routes if getattr(route, "path", "").startswith("/api/")}
        assert len(paths) >= 11
        for path, method in [*paths.items(), ("/api/no-such-thing", "GET")]:
            r = bare.request(method, path)
            assert r.status_code == 401 and "token" in r.json()["detail"], (method, path, r.status_code)


# -- 2. large images: pixels limited, decodes bounded, the server's peak flat -----------------------------------------
def test_an_image_is_limited_to_the_pixels_the_model_can_use(base_ws):
    limit = 2048 * 2048  # a 16 px model: (16 x 16)^2 is under the 2048^2 floor
    with client(base_ws) as c:
        r = c.post("/api/predict", files=[("images", ("big.png", bomb_png(9400, 9400), "image/png"))])
        assert r.status_code == 413 and "9400x9400 pixels (88.4 MP)" in r.json()["detail"], r.text
        assert f"{limit / 1e6:.1f} MP" in r.json()["detail"] and "\n" not in r.json()["detail"]
        # a camera-sized JPEG passes: libjpeg decodes it at 1/8 scale (draft), 750x563 here
        photo = io.BytesIO()
        Image.new("RGB", (6000, 4500), (90, 120, 30)).save(photo, "JPEG", quality=80)
        assert c.post("/api/predict", files=[("images", ("photo.jpg", photo.getvalue(), "image/jpeg"))]).status_code == 200
        at_limit = c.post("/api/predict", files=[("images", ("ok.png", gradient_png(2048), "image/png"))])
        assert at_limit.status_code == 200, at_limit.text


PEAK_BOUND = 128 * 2**20


def test_parallel_uploads_of_large_images_keep_the_servers_peak_memory_flat(base_ws):
    """16 clients at once, each with a 2048^2 PNG (the most a 16 px model decodes, 12.6 MB as
    RGB), then 6 with an 88-megapixel one (refused from its header): the server's peak RSS rises
    by less than PEAK_BOUND, 2 decode slots' worth, whatever the number of clients. Before the
    fix: +180 to +201 MiB and +1978 to +2010 MiB (README, "serve")."""
    with serve_process(base_ws) as (proc, port, token, _, _):
        rise, statuses = parallel_upload_peak(proc.pid, port, token, gradient_png(2048), 16)
        print(f"16 parallel 2048^2 PNGs: peak RSS +{rise / 2**20:.0f} MiB")
        assert statuses == [200] * 16 and rise < PEAK_BOUND, (statuses, rise / 2**20)
        rise, statuses = parallel_upload_peak(proc.pid, port, token, bomb_png(9400, 9400), 6)
        print(f"6 parallel 88 MP PNGs: peak RSS +{rise / 2**20:.0f} MiB")
        assert statuses == [413] * 6 and rise < PEAK_BOUND, (statuses, rise / 2**20)


# -- 3. sockets that never finish their headers -----------------------------------------------------------------------
def closed_by_server(sockets: list[socket.socket], within: float, trickle: socket.socket | None = None) -> set:
    """The sockets the server has not closed after `within` seconds (a trickler keeps sending)."""
    open_ = set(sockets)
    deadline = time.monotonic() + within
    while open_ and time.monotonic() < deadline:
        if trickle is not None and trickle in open_:
            try:
                trickle.send(b"X")  # one more header byte: must not extend its deadline
            except OSError:
                open_.discard(trickle)
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for s in ready:
            try:
                if s.recv(4096) == b"":
                    open_.discard(s)
            except OSError:
                open_.discard(s)
    return open_


def test_sockets_that_never_finish_their_headers_are_closed_and_lock_nobody_out(base_ws):
    port = free_port()
    settings = ServerSettings(workspace=base_ws, port=port, token=TOKEN, header_timeout_s=1.0)
    with uvicorn_thread(settings):
        idle = []
        try:
            for i in range(300):  # a few hundred: half silent, half with headers begun and never ended
                s = socket.create_connection(("127.0.0.1", port))
                if i % 2:
                    s.sendall(f"GET /api/workspace HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Edge".encode())
                idle.append(s)
            started = time.monotonic()
            assert get(port, "/api/workspace") == 200  # the board's user still gets in
            still_open = closed_by_server(idle, within=settings.header_timeout_s + 8, trickle=idle[1])
            assert not still_open, f"{len(still_open)} of {len(idle)} idle sockets still open"
            assert time.monotonic() - started >= settings.header_timeout_s * 0.5  # by the timeout, not at once
            assert get(port, "/api/workspace") == 200
        finally:
            for s in idle:
                s.close()


def test_past_max_connections_a_request_gets_503_until_the_idle_ones_time_out(base_ws):
    port = free_port()
    settings = ServerSettings(workspace=base_ws, port=port, token=TOKEN, header_timeout_s=1.0, max_connections=20)
    with uvicorn_thread(settings):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(25)]
        try:
            time.sleep(0.2)
            assert get(port, "/api/workspace") == 503  # bounded: the server holds no more than this
            assert not closed_by_server(idle, within=settings.header_timeout_s + 8)
            assert get(port, "/api/workspace") == 200
        finally:
            for s in idle:
                s.close()


# -- 4. headers: no-store on the page, the security headers on the guard's refusals too --------------------------------
def test_the_page_is_not_stored_and_every_refusal_carries_the_security_headers(base_ws):
    with client(base_ws, max_request_bytes=10_000) as c:
        bare = tokenless(c)
        page = bare.get("/")
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        assert all(h in page.headers for h in SECURITY_HEADERS)
        assert bare.get("/static/app.js").headers["cache-control"] == "no-cache"  # revalidated, holds no secret
        refusals = [
            bare.get("/api/workspace"),  # 401, no token
            c.get("/api/workspace", headers={"X-Edge-Token": "wrong"}),  # 401, wrong token
            c.get("/", headers={"Host": "evil.example"}),  # 400, DNS rebinding
            c.post("/api/export", headers={"Origin": "http://evil.example"}),  # 403, another site
            c.post("/api/predict", content=b"x" * 20_000, headers={"content-type": "multipart/form-data; boundary=b"}),
        ]
        assert [r.status_code for r in refusals] == [401, 401, 400, 403, 413]
        for r in refusals:
            missing = [h for h in SECURITY_HEADERS if h not in r.headers]
            assert not missing and r.headers["cache-control"] == "no-store", (r.status_code, missing)
        assert c.get("/api/workspace").headers["cache-control"] == "no-store"


# -- 5. the token file -----------------------------------------------------------------------------------------------------
def test_a_token_file_readable_by_others_or_a_guessable_token_is_refused_in_one_line(tmp_path, base_ws):
    good = "k3Jx9_QmZr2vT8wLpA4sN6yHbC1eFgUd-oWq"  # 36 characters of base64url: 216 bits by the estimate
    path = tmp_path / "token"
    path.write_text(good + "\n")
    path.chmod(0o644)
    code, _, err = cli("serve", base_ws, "--token-file", path)
    assert code == 2 and "open to group or others (mode 0644)" in err and "chmod 600" in err, err
    assert len(err.strip().splitlines()) == 1
    path.chmod(0o640)
    with pytest.raises(UserError, match="mode 0640"):
        read_token_file(path)
    path.chmod(0o600)
    assert read_token_file(path) == good
    for weak in ("aaaaaaaaaaaaaaaa", "ab" * 30, "password123password123", "0123456789abcdef"):
        path.write_text(weak)
        code, _, err = cli("serve", base_ws, "--token-file", path)
        assert code == 2 and "bits of entropy, under 128" in err and len(err.strip().splitlines()) == 1, (weak, err)
    assert token_bits("0123456789abcdef" * 2) == 128  # 32 hex characters: exactly 128 bits
    assert token_bits("aaaaaaaaaaaaaaaa") == 0


# -- 6. class names: NFC, and no look-alike of a known one ------------------------------------------------------------------
def test_class_names_are_nfc_and_a_look_alike_of_a_known_class_is_refused(ws_copy, digits):
    nfc, nfd = "café", unicodedata.normalize("NFD", "café")
    assert nfc != nfd and check_new_class_name(nfd, []) == nfc
    assert check_class_name(nfd) == nfd  # the old rule, as commands.py calls it
    refused = [(nfc, [nfd]), ("аirplane", ["airplane"]), ("Airplane", ["airplane"]), ("ＣＡＴ", ["cat"]),
               ("Αpple", ["apple"]), ("ΚΟΤ", ["KOT"])]
    for name, known in refused:
        with pytest.raises(UserError) as e:
            check_new_class_name(name, known)
        assert "\n" not in str(e.value) and repr(known[0]) in str(e.value), (name, str(e.value))
    assert check_new_class_name(nfd, ["café"]) == "café"  # the same class: the learner's own refusal follows
    assert "U+0430 CYRILLIC SMALL LETTER A" in _refusal("аirplane", ["airplane"])
    for fine, known in (("Käfer", ["Kafer"]), ("O", ["0"]), ("l", ["1"]), ("dog", ["cat"])):
        assert check_new_class_name(fine, known) == fine
    with client(ws_copy) as c:
        for per_class, text in (({nfc: digits["2"][:1], nfd: digits["3"][:1]}, "given twice"),
                                ({"airplane": digits["2"][:1], "аirplane": digits["3"][:1]}, "look-alike"),
                                ({"０": digits["2"][:1]}, "known class '0'")):  # full-width zero
            data, files = step_form(per_class)
            r = c.post("/api/steps", data=data, files=files)
            assert r.status_code == 400 and text in r.json()["detail"], r.text
        data, files = step_form({nfd: digits["2"][:2]})
        r = c.post("/api/steps", data=data, files=files)
        assert r.status_code == 202 and r.json()["classes"] == [nfc], r.text
        staged = [p.name for p in (ws_copy / "staging" / r.json()["id"]).iterdir()]
        c.post(f"/api/jobs/{r.json()['id']}/cancel")
        assert staged == [nfc]


def _refusal(name: str, known: list[str]) -> str:
    with pytest.raises(UserError) as e:
        check_new_class_name(name, known)
    return str(e.value)


@pytest.fixture
def ws_copy(base_ws, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "ws"
    shutil.copytree(base_ws, copy)
    return copy


# -- 7. refuse first -------------------------------------------------------------------------------------------------------------
def test_a_second_step_is_refused_before_its_uploads_are_read_and_export_bodies_are_capped(ws_copy, digits,
                                                                                          monkeypatch):
    import edge_m2kd.server.uploads as uploads

    decoded = []
    real = uploads.decode_upload
    monkeypatch.setattr(uploads, "decode_upload", lambda *a, **k: decoded.append(a[2]) or real(*a, **k))
    with client(ws_copy) as c:
        jobs = c.app.state.jobs
        running = JobState(id="f" * 16, classes=["5"], images=1, status="running", pid=os.getpid())
        jobs._jobs[running.id], jobs.current = running, running.id  # a step started here, still training
        data, files = step_form({"6": digits["2"][:3] + [b"not an image at all"]})
        r = c.post("/api/steps", data=data, files=files)
        assert r.status_code == 409 and "busy" in r.json()["detail"], r.text
        staging = ws_copy / "staging"
        assert decoded == [] and (not staging.exists() or not any(staging.iterdir()))
        running.status = "done"
        r = c.post("/api/steps", data=data, files=files)  # once it has ended: checked, decoded, refused by content
        assert r.status_code == 400 and "is not an image" in r.json()["detail"] and decoded
        # export takes a small JSON body: a large one is a 413 before it is parsed, whether or not
        # it says its length
        big = json.dumps({"tensorrt": False, "pad": "x" * 2**20}).encode()
        r = c.post("/api/export", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 64 KiB" in r.json()["detail"], r.text
        r = c.post("/api/export", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text


# -- the measurement behind the README's figure ------------------------------------------------------------------------------------
if __name__ == "__main__":
    # python tests/test_serve_security.py WS [N [TREE]]: TREE, a source tree to serve from (e.g.
    # `git archive` of an older commit), for a before/after figure.
    ws, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    tree = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    bomb = bomb_png(9400, 9400)
    for label, blob in ((f"88 MP PNGs (9400x9400, {len(bomb) // 1024} KB)", bomb), ("2048x2048 PNGs", gradient_png(2048))):
        with serve_process(ws, tree=tree) as (proc, port, token, _, _):
            start = time.monotonic()
            rise, statuses = parallel_upload_peak(proc.pid, port, token, blob, n)
            print(f"{n} parallel {label}: server peak RSS +{rise / 2**20:.0f} MiB over its RSS before, "
                  f"statuses {sorted(set(statuses))}, {time.monotonic() - start:.1f} s", flush=True)
