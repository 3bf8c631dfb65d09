"""The reward server (portraitgen/serving) and the remote reward backend, with real server processes on
loopback: equal scores, batching across client processes, a server killed mid-training, config mismatch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from portraitgen.launch import free_port

from helpers import REPO, fast_params

pytestmark = pytest.mark.timeout(240)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "tests")}


class Server:
    """``portraitgen reward-server`` in a subprocess, up once /health answers (bounded wait)."""

    def __init__(self, params: Path, port: int, log: Path, *extra: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "portraitgen", "reward-server", "--params", str(params),
                                          "--host", "127.0.0.1", "--port", str(port), "--threads", "1", *extra],
                                         env=_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"reward server exited early:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise AssertionError(f"reward server not up in 120 s:\n{log.read_text()[-3000:]}")

    def info(self) -> dict:
        return requests.get(self.url + "/info", timeout=10).json()

    def stop(self) -> int:
        """SIGTERM: a graceful stop exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _portrait_batch(n: int = 4, size: int = 96) -> torch.Tensor:
    """A real portrait (so the face-based reward finds a face), its mirror, and smooth random images."""
    import matplotlib.cbook
    from PIL import Image

    face = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((size, size))
    face = torch.from_numpy(np.asarray(face).copy()).permute(2, 0, 1).float() / 255
    g = torch.Generator().manual_seed(0)
    rest = torch.nn.functional.interpolate(torch.rand(n - 2, 3, 6, 6, generator=g), size=(size, size),
                                           mode="bicubic").clamp(0, 1)
    return torch.cat([face[None], face.flip(-1)[None], rest])


REWARD = {"components": {"omni_vlm": 1.0, "ai_portrait_classic": 0.5, "jpeg_compressibility": 0.1, "brightness": 0.2},
          "options": {"omni_vlm": {"model_path": "builtin:tiny", "image_size": 56}, "jpeg_compressibility": {},
                      "ai_portrait_classic": {}, "brightness": {}},
          "normalize": {"ai_portrait_classic": {"mean": 0.5, "std": 0.25, "clip": 3.0}}, "on_invalid": "mask"}


def _remote(reward: dict, url: str, **settings) -> dict:
    out = json.loads(json.dumps(reward))
    for name, opts in out["options"].items():
        opts["server"] = {"url": url, **settings, **({"encoding": "float32"} if name == "brightness" else {})}
    return out


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward-server")
    port = free_port()
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"reward": _remote(REWARD, f"http://127.0.0.1:{port}")}))
    server = Server(params, port, folder / "server.log", "--max-batch", "64", "--max-wait-ms", "1500")
    yield server, params
    assert server.stop() == 0, (folder / "server.log").read_text()[-3000:]


def test_scores_through_the_server_equal_in_process_scores(scoring_server):
    from portraitgen.config import load_params, params_from_dict, reward_config_hash
    from portraitgen.rewards import RewardSet

    server, params_path = scoring_server
    params = load_params(params_path)
    remote = RewardSet.from_config(params.reward)
    local = RewardSet.from_config(params_from_dict({"reward": REWARD}).reward)
    images, prompts = _portrait_batch(), ["a portrait photo of a woman"] * 4
    meta = [{"group": i // 2} for i in range(4)]
    want, got = local(images, prompts, meta), remote(images, prompts, meta)
    assert set(got) == set(want) and "ai_portrait_classic/oily" in got and "omni_vlm/expected_rating" in got
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
    assert got["ai_portrait_classic/face_found"][:2].tolist() == [1.0, 1.0]  # real scores, not a constant
    assert np.ptp(got["omni_vlm"]) > 0 and np.ptp(got["total"]) > 0
    info = server.info()
    assert info["reward_config_hash"] == reward_config_hash(params) == reward_config_hash(params_from_dict({"reward": REWARD}))
    assert sorted(info["components"]) == sorted(REWARD["components"])


def test_png_encoding_scores_like_uint8(scoring_server):
    from portraitgen.rewards import RewardSet

    server, _ = scoring_server
    reward = {"components": {"jpeg_compressibility": 1.0}, "options": {"jpeg_compressibility": {}}}
    images = _portrait_batch()
    png = RewardSet({"jpeg_compressibility": 1.0}, options=_remote(reward, server.url, encoding="png")["options"])
    local = RewardSet({"jpeg_compressibility": 1.0})
    np.testing.assert_allclose(png(images, ["x"] * 4)["total"], local(images, ["x"] * 4)["total"], atol=1e-6)


CLIENT = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from portraitgen.rewards import RewardSet
    url, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rs = RewardSet({"jpeg_compressibility": 1.0}, options={"jpeg_compressibility": {"server": url}})
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(int(me)))
    (folder / f"ready{me}").touch()
    deadline = time.monotonic() + 60
    while not (folder / "go").exists():
        assert time.monotonic() < deadline, "no go signal"
        time.sleep(0.02)
    rs(images, ["a"] * 4)
    print(json.dumps(rs.rewards["jpeg_compressibility"].group.last_batch))
""")


def test_two_client_processes_are_batched_together(scoring_server, tmp_path):
    server, _ = scoring_server
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    clients = [subprocess.Popen([sys.executable, str(script), server.url, str(tmp_path), str(i)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"ready{i}").exists() for i in (1, 2)):
        assert time.monotonic() < deadline and all(c.poll() is None for c in clients), \
            [c.communicate()[1][-2000:] for c in clients if c.poll() is not None]
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both send now; the server waits up to 1.5 s to batch them
    outs = [c.communicate(timeout=60) for c in clients]
    assert all(c.returncode == 0 for c in clients), [err[-2000:] for _, err in outs]
    batches = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [b["images"] for b in batches] == [8, 8] and [b["requests"] for b in batches] == [2, 2]
    hist = server.info()["histogram"]
    assert hist["batch_images"].get("8", 0) >= 1 and hist["batch_requests"].get("2", 0) >= 1  # > one client's 4


def test_a_server_with_another_reward_config_is_refused(scoring_server):
    from portraitgen.rewards import RewardSet
    from portraitgen.rewards.remote import RewardServerError

    server, _ = scoring_server
    other = {"jpeg_compressibility": {"quality": 80, "server": {"url": server.url, "wait_s": 5}}}
    with pytest.raises(RewardServerError, match="config hash .* differs from params") as exc:
        RewardSet({"jpeg_compressibility": 1.0}, options=other)
    assert server.url in str(exc.value) and "quality" in str(exc.value)
    # The server checks every request too: a client that skipped the check gets a 409 naming the reward.
    from portraitgen.rewards.remote import encode_images, pack_request

    fields, payload = encode_images(torch.rand(1, 3, 8, 8), "uint8")
    body = pack_request({"protocol": 1, "components": [{"name": "jpeg_compressibility", "config_hash": "0" * 16}],
                         "prompts": ["a"], "meta": [{}], **fields}, payload)
    resp = requests.post(server.url + "/score", data=body, timeout=30)
    assert resp.status_code == 409 and "jpeg_compressibility" in resp.json()["detail"]


def test_unreachable_server_fails_with_its_url_after_the_wait_budget():
    from portraitgen.rewards import RewardSet
    from portraitgen.rewards.remote import RewardServerError

    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=f"reward server {url} is unreachable"):
        RewardSet({"brightness": 1.0}, options={"brightness": {"server": {"url": url, "wait_s": 1.5, "backoff_s": 0.2}}})
    assert 1.0 < time.monotonic() - t0 < 10


def _training(tmp_path: Path, url: str | None) -> dict:
    d = fast_params(**{"train.iterations": 3, "model.path": "builtin:tiny", "model.family": "sd3"})
    d["reward"] = {"components": {"brightness": 1.0}}
    if url:
        d["reward"]["options"] = {"brightness": {"server": {"url": url, "encoding": "float32", "wait_s": 2.0,
                                                            "backoff_s": 0.2}}}
    return d


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_server_killed_mid_training_stops_naming_the_url_and_the_run_resumes_exactly(tmp_path):
    from portraitgen.config import params_from_dict
    from portraitgen.rewards.remote import RewardServerError
    from portraitgen.training import GRPOTrainer

    torch.set_num_threads(1)
    GRPOTrainer(params_from_dict(_training(tmp_path, None)), tmp_path / "local").run()  # uninterrupted, in process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_training(tmp_path, url)))
    server = Server(params, port, tmp_path / "server.log")
    trainer = GRPOTrainer(params_from_dict(_training(tmp_path, url)), tmp_path / "remote")
    save = trainer.save_checkpoint

    def save_then_kill(it):  # the server dies right after the first checkpoint
        save(it)
        if it == 0:
            server.proc.kill()
            server.proc.wait(10)

    trainer.save_checkpoint = save_then_kill
    with pytest.raises(RewardServerError, match=f"reward server {url} is unreachable"):
        trainer.run()
    assert len(_rows(tmp_path / "remote")) == 1  # iteration 1 never used a missing reward

    server = Server(params, port, tmp_path / "server.log")  # back: the rerun resumes from iteration 0's checkpoint
    try:
        resumed = GRPOTrainer(params_from_dict(_training(tmp_path, url)), tmp_path / "remote")
        resumed.run()
    finally:
        assert server.stop() == 0
    assert resumed.start_iteration == 1
    assert _rows(tmp_path / "remote") == _rows(tmp_path / "local")  # the same run as an uninterrupted one


def test_serve_while_runs_a_command_against_the_server_then_stops(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"reward": {"components": {"brightness": 1.0},
                                                 "options": {"brightness": {"server": url}}}}))
    probe = ("import os, requests; u = os.environ['PORTRAITGEN_REWARD_SERVER_URL']; "
             "assert requests.get(u + '/health', timeout=5).json()['components'] == ['brightness']; raise SystemExit(3)")
    proc = subprocess.run([sys.executable, "-m", "portraitgen", "reward-server", "--params", str(params),
                           "--address-file", str(tmp_path / "address.json"), "--serve-while", "--",
                           sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the command's own status
    assert f"reward server ready at {url}" in proc.stderr
    assert not (tmp_path / "address.json").exists()  # removed on exit
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)


def test_cluster_recipe_address_file_and_stop_when_the_consumer_is_done(tmp_path):
    """The workflow's server job: clients find it by its address file; it stops once the consumer's output is
    written (an older copy of that file does not count) and leaves what it served in --info-out."""
    from portraitgen.rewards import RewardSet

    done, address, info = tmp_path / "metrics.json", tmp_path / "address.json", tmp_path / "served.json"
    done.write_text("{}")  # left from an earlier run
    os.utime(done, (time.time() - 60, time.time() - 60))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"reward": {"components": {"brightness": 1.0}, "options": {"brightness": {
        "server": {"address_file": str(address), "wait_s": 90, "encoding": "float32"}}}}}))
    proc = subprocess.Popen([sys.executable, "-m", "portraitgen", "reward-server", "--params", str(params), "--port", "0",
                             "--address-file", str(address), "--stop-when-exists", str(done), "--info-out", str(info)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        rs = RewardSet({"brightness": 1.0}, options=yaml.safe_load(params.read_text())["reward"]["options"])  # waits
        images = torch.rand(3, 3, 16, 16)
        np.testing.assert_allclose(rs(images, ["a"] * 3)["total"], RewardSet({"brightness": 1.0})(images, ["a"] * 3)["total"],
                                   atol=1e-6)
        assert proc.poll() is None  # the old metrics.json did not stop it
        done.write_text("{}")
        assert proc.wait(30) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(info.read_text())["totals"]["images"] == 3 and not address.exists()


def test_uint8_transport_quantises_exactly_like_the_rewards():
    from portraitgen.rewards.remote import decode_images, encode_images, pack_request, unpack_request, uint8_hwc
    from portraitgen.rewards.simple import to_uint8_hwc

    x = torch.rand(3, 3, 17, 9, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, :6] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, -0.1, 1.2, float("nan")]).nan_to_num(0.0)
    assert np.array_equal(uint8_hwc(x), to_uint8_hwc(x))  # rounding half to even, clamping: bit for bit
    for enc in ("uint8", "png", "float32"):
        fields, payload = encode_images(x, enc)
        header, body = unpack_request(pack_request({"prompts": ["a"] * 3, **fields}, payload))
        y = decode_images(header, body)
        assert y.shape == x.shape and header["prompts"] == ["a"] * 3
        if enc == "float32":
            assert torch.equal(y, x)
        else:  # what the server's rewards quantise again is the client's quantisation
            assert np.array_equal(to_uint8_hwc(y), to_uint8_hwc(x))


def test_batcher_splits_scores_and_error_reasons_back_to_each_request():
    """In process, no HTTP: two requests scored as one batch get their own slices, NaN as null, and each
    unscored image's reason re-indexed to its request."""
    from portraitgen.rewards import PartsReward
    from portraitgen.serving.service import RewardService, ServedReward

    class DarkIsUnscorable(PartsReward):
        def parts(self, images, prompts, meta):
            mean = images.mean(dim=(1, 2, 3)).double().numpy()
            self.last_errors = {i: "too dark" for i in np.flatnonzero(mean < 0.1)}
            return {"score": np.where(mean < 0.1, np.nan, mean), "doubled": 2 * mean}

    service = RewardService([ServedReward("dark", {}, "h", DarkIsUnscorable())], max_batch=8, max_wait_s=5.0)
    a = torch.stack([torch.full((3, 4, 4), v) for v in (0.5, 0.0)])
    b = torch.stack([torch.full((3, 4, 4), v) for v in (0.05, 0.25, 0.75)])
    rewards = service.resolve([{"name": "dark", "config_hash": "h"}])
    futures = [service.submit(rewards, x, ["p"] * len(x), [{}] * len(x)) for x in (a, b)]
    service.start()
    try:
        ra, rb = (f.result(timeout=30) for f in futures)
    finally:
        service.stop()
    assert ra["batch"] == {**ra["batch"], "images": 5, "requests": 2}
    assert ra["results"]["dark"]["parts"]["score"] == [0.5, None] and ra["results"]["dark"]["errors"] == {"1": "too dark"}
    assert rb["results"]["dark"]["parts"]["score"] == [None, 0.25, 0.75] and rb["results"]["dark"]["errors"] == {"0": "too dark"}
    assert rb["results"]["dark"]["parts"]["doubled"] == pytest.approx([0.1, 0.5, 1.5])
    assert service.info()["histogram"] == {"batch_images": {"5": 1}, "batch_requests": {"2": 1}}
    with pytest.raises(LookupError, match="differs from this server's"):
        service.resolve([{"name": "dark", "config_hash": "other"}])
