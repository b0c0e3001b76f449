"""`dcpo serve` under bad and hostile input (issue 34): every refusal is an HTTP status with a
one-line JSON error, and leaves the served weights, fingerprint and load count exactly as
they were (checked by generating again: the same tokens and log-probs, bit for bit); every
field of the protocol's requests is walked with out-of-range values; a request whose client
is gone, or whose time is up, stops generating; SIGTERM and Ctrl-C stop the server cleanly;
bad --host / --token / --server-token values are one line before any engine loads."""

from __future__ import annotations

import dataclasses
import http.client
import json
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from conftest import assert_one_line_error, run_dcpo
from servers import (
    broken_models,
    completion,
    fake_server,
    get_json,
    groups,
    post,
    rollout,
    serving,
    tiny_tensors,
    via,
)

from dcpo_cli.engines.base import SamplingSettings
from dcpo_cli.files.model_source import model_identity

PROMPTS = [[5, 6, 7], [8, 9]]
SETTINGS = {"n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
            "seed": 1}


def generate(url: str, fingerprint: str, **changes) -> list:
    """A sampled generation's completions (tokens and log-probs), or fail."""
    body = {"prompt_token_ids": PROMPTS, "settings": SETTINGS, "fingerprint": fingerprint,
            **changes}
    status, lines = post(url, "/generate", body)
    assert status == 200, lines
    assert "completions" in lines[-1], lines[-1]
    return lines[-1]["completions"]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """A server on the tiny model and what it generates before any refusal."""
    with serving(tiny / "model", tmp_path_factory.mktemp("served")) as (url, process):
        identity = get_json(url, "/health")[1]
        yield url, identity, generate(url, identity["fingerprint"])


def assert_unchanged(served) -> None:
    """The served weights, fingerprint and load count are what they were at the start."""
    url, identity, before = served
    now = get_json(url, "/health")[1]
    assert now["fingerprint"] == identity["fingerprint"]
    assert now["weight_loads"] == identity["weight_loads"]
    assert generate(url, identity["fingerprint"]) == before


# Out-of-range values for every field of SamplingSettings (checked to cover them all below)
BAD_SETTINGS = {
    "n": [0, -1, 10 ** 23, 1.5, "2", True, None],
    "temperature": [-1.0, 1e-300, float("inf"), float("nan"), "1", None],
    "top_p": [0.0, -0.5, 1.5, float("nan"), "1"],
    "top_k": [-1, 10 ** 23, 10 ** 6, 0.5, False],
    "max_new_tokens": [0, -5, 10 ** 9, 512, 10 ** 23, 2.0],
    "seed": [2 ** 64, -(2 ** 64), 1.5, "0", None],
}
BAD_PROMPTS = [None, "x", [], [[]], [[-1]], [[5000]], [[10 ** 23]], [[1.5]], [["a"]],
               [[True]], [[5, 6]] * 70_000, [[5] * 600], {"0": [5]}]


@pytest.mark.slow
def test_every_request_field_out_of_range_is_a_4xx_and_changes_nothing(served):
    url, identity, _ = served
    assert set(BAD_SETTINGS) == {f.name for f in dataclasses.fields(SamplingSettings)}
    fingerprint = identity["fingerprint"]
    cases = [{"settings": {**SETTINGS, name: value}} for name, values in BAD_SETTINGS.items()
             for value in values]
    cases += [{"settings": {**SETTINGS, "beam_width": 2}}, {"settings": None},
              {"settings": [1]}]
    cases += [{"prompt_token_ids": value} for value in BAD_PROMPTS]
    cases += [{"fingerprint": value} for value in (None, 5, ["x"], "0" * 64)]
    for change in cases:
        body = {"prompt_token_ids": PROMPTS, "settings": SETTINGS, "fingerprint": fingerprint,
                **change}
        status, reply = post(url, "/generate", body)
        assert status in (400, 409, 413), (change, status, reply)
        assert isinstance(reply, dict) and set(reply) <= {"error", "code"}, reply
        assert "\n" not in reply["error"]
    # the limits are the served model's: its vocabulary and context
    limits = identity["limits"]
    assert limits["vocab_size"] > max(map(max, PROMPTS))
    assert limits["context_length"] == 512
    status, reply = post(url, "/generate", {"prompt_token_ids": [[5] * 500], "settings": {
        **SETTINGS, "max_new_tokens": 13}, "fingerprint": fingerprint})
    assert status == 400 and "context of 512 tokens" in reply["error"], reply
    # a body that is not a request at all
    for raw in (b"{", b"[1]", b"\"x\"", b"[" * 100_000):
        status, reply = post(url, "/generate", None, raw=raw)
        assert status == 400 and "error" in reply, (raw[:5], reply)
    assert_unchanged(served)


@pytest.mark.slow
def test_other_weights_is_a_409_before_anything_streams(served):
    url, _, _ = served
    status, reply = post(url, "/generate", {"prompt_token_ids": PROMPTS, "settings": SETTINGS,
                                            "fingerprint": "0" * 64})
    assert (status, reply["code"]) == (409, "other_weights"), reply


def test_unknown_methods_and_endpoints_are_json(served):
    url, _, _ = served
    parts = urlsplit(url)
    for method in ("PUT", "DELETE", "BREW"):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        connection.request(method, "/generate")
        response = connection.getresponse()
        assert response.status in (404, 405, 501)
        assert "error" in json.loads(response.read())
        connection.close()


def test_a_refused_load_changes_nothing(served, tiny, tmp_path):
    url, _, _ = served
    for what, folder in broken_models(tiny, tmp_path).items():
        status, reply = post(url, "/load-weights", {
            "model": {"spec": what, "path": str(folder)},
            "fingerprint": model_identity(folder)})
        assert status == 422, (what, status, reply)
        assert "\n" not in reply["error"], reply
        assert_unchanged(served)


# Out-of-range values for every field of a load request's model record (ModelSource)
BAD_MODEL_FIELDS = {"path": [5, None, "relative/model", "/a\0b"], "spec": [5, ["x"]],
                    "repo_id": [5, {}], "revision": [5.5, []], "commit": [True, ["x"]]}


def test_every_load_field_out_of_range_is_a_4xx_and_changes_nothing(served, tiny):
    from dcpo_cli.files.model_source import ModelSource

    url, identity, _ = served
    assert set(BAD_MODEL_FIELDS) == {f.name for f in dataclasses.fields(ModelSource)}
    model = {"spec": "m", "path": str((tiny / "model").resolve())}
    fingerprint = identity["fingerprint"]
    cases = [({"model": {**model, name: value}, "fingerprint": fingerprint}, 400)
             for name, values in BAD_MODEL_FIELDS.items() for value in values]
    cases += [({"model": value, "fingerprint": fingerprint}, 400) for value in (None, "x", [])]
    cases += [({"model": {**model, "path": "/no/such/model"}, "fingerprint": "0" * 64}, 409),
              ({"model": {**model, "path": "/"}, "fingerprint": "0" * 64}, 409)]
    cases += [({"model": model, "fingerprint": value}, 400) for value in (None, 5)]
    cases += [({"model": model, "fingerprint": "0" * 64}, 409)]  # it sees other files there
    for body, expected in cases:
        status, reply = post(url, "/load-weights", body)
        assert status == expected, (body, status, reply)
        assert isinstance(reply, dict) and "error" in reply, reply
    assert_unchanged(served)


def test_the_hf_engine_refuses_a_load_before_copying(tiny):
    import torch

    from dcpo_cli.engines.hf import HFEngine
    from dcpo_cli.errors import DcpoError

    engine = HFEngine(tiny / "model", device="cpu")
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    weights = tiny_tensors(tiny)
    embed = "model.embed_tokens.weight"
    for bad in ({embed: torch.zeros_like(weights[embed])},
                {**weights, embed: torch.zeros(3, 7)},
                {**weights, "lm_head.bias": torch.zeros(1)}):
        with pytest.raises(DcpoError, match="do not fit the model"):
            engine.load_weights(bad)
        after = engine.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    engine.load_weights(weights)  # the right ones still load (a tied head may be absent)


@pytest.mark.slow
def test_a_client_reloads_on_other_weights(tiny, served, tmp_path):
    """"other weights" (409, or that code in the stream: switched while the request waited)
    makes the client load its weights and ask again, as the README promises."""
    _, identity, _ = served
    for in_stream in (False, True):
        calls = []

        def reply(request, in_stream=in_stream, calls=calls):
            calls.append(request.get("prompt_token_ids") is not None)
            if "model" in request:  # /load-weights: now serving the client's weights
                return json.dumps({**identity, "fingerprint": request["fingerprint"]}).encode()
            if calls.count(True) == 1:
                line = {"error": "switched", "code": "other_weights"}
                return (json.dumps(line).encode() + b"\n", 200 if in_stream else 409)
            return json.dumps({"completions": groups(request, lambda i: completion([5, 6])),
                               "fingerprint": request["fingerprint"]}).encode() + b"\n"

        fake = fake_server(identity, reply)
        try:
            url = f"http://127.0.0.1:{fake.server_address[1]}"
            out = tmp_path / f"rollouts-{in_stream}.parquet"
            result = rollout(tiny / "model", tiny, out, *via(url))
            assert result.code == 0, result.stderr
            assert calls == [True, False, True]  # generate, load-weights, generate
        finally:
            fake.shutdown()
            fake.server_close()


def long_request(url: str) -> socket.socket:
    """Start a generate request that would take many minutes; returns its socket once the
    reply streams (its status line and headers read)."""
    identity = get_json(url, "/health")[1]
    body = json.dumps({"prompt_token_ids": [[5, 6, 7]] * 2000,
                       "settings": {**SETTINGS, "n": 16, "max_new_tokens": 500},
                       "fingerprint": identity["fingerprint"]}).encode()
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=600)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.0 200"), head
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 300  # a bound against hanging, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow
def test_a_gone_client_stops_its_generation_and_others_are_served(tiny, tmp_path):
    with serving(tiny / "model", tmp_path) as (url, _):
        long_request(url).close()
        log = next(tmp_path.glob("server-*.log"))
        wait_for(lambda: "the client went away; stopped" in log.read_text(), log.read_text())
        assert generate(url, get_json(url, "/health")[1]["fingerprint"])


@pytest.mark.slow
def test_a_request_past_its_time_is_stopped_with_one_line(tiny, tmp_path):
    with serving(tiny / "model", tmp_path, "--request-timeout", "1e-9") as (url, _):
        out = tmp_path / "rollouts.parquet"
        assert_one_line_error(rollout(tiny / "model", tiny, out, *via(url)),
                              "--request-timeout")
        assert not out.exists()


@pytest.mark.slow
def test_a_request_past_the_size_limits_is_413_and_one_line(tiny, tmp_path):
    with serving(tiny / "model", tmp_path, "--max-responses", "5") as (url, _):
        fingerprint = get_json(url, "/health")[1]["fingerprint"]
        status, reply = post(url, "/generate", {"prompt_token_ids": PROMPTS * 2, "settings":
                                                SETTINGS, "fingerprint": fingerprint})
        assert status == 413 and "--max-responses" in reply["error"]
        out = tmp_path / "rollouts.parquet"
        assert_one_line_error(rollout(tiny / "model", tiny, out, *via(url)), "too large",
                              "--max-responses")
        assert not out.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_a_signal_during_a_request_stops_the_server_cleanly(tiny, tmp_path, sig, code):
    with serving(tiny / "model", tmp_path) as (url, process):
        sock = long_request(url)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(read_all(sock).splitlines()))
        reader.start()
        process.send_signal(sig)
        assert process.wait(timeout=300) == code
        reader.join(timeout=300)
        assert json.loads(lines[-1])["code"] == "stopping"
    log = next(tmp_path.glob("server-*.log")).read_text()
    assert "terminate called" not in log and "Traceback" not in log, log
    assert "dcpo serve: stopped" in log


@pytest.mark.parametrize("flags, message", [
    (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1"),
    (["--token", "a\nb"], "printable ASCII"),
    (["--token", "sécret"], "non-ASCII"),
    (["--max-responses", "0"], "--max-responses"),
    (["--request-timeout", "-1"], "--request-timeout"),
])
def test_bad_serve_flags_are_one_line_before_the_engine_loads(tiny, flags, message):
    result = run_dcpo("serve", "--model", tiny / "model", "--engine", "hf", "--port", "0",
                      *flags)
    assert_one_line_error(result, message)
    assert "warning" not in result.stderr and "ready" not in result.stdout


@pytest.mark.parametrize("token", ["a\nb", "sécret", "a b"])
def test_a_bad_server_token_is_one_line(tiny, tmp_path, token):
    out = tmp_path / "rollouts.parquet"
    result = rollout(tiny / "model", tiny, out, *via("http://127.0.0.1:9"),
                     env={"DCPO_SERVER_TOKEN": token})
    assert_one_line_error(result, "--server-token")
    assert not out.exists()


def test_loads_still_switch_weights_after_refusals(served, tiny, other_weights, tmp_path):
    """A good load after the refusals above works, and back (so the module's server ends
    as it started)."""
    url, identity, before = served
    status, reply = post(url, "/load-weights", {
        "model": {"spec": "other", "path": str(other_weights)},
        "fingerprint": model_identity(other_weights)})
    assert status == 200 and reply["fingerprint"] == model_identity(other_weights), reply
    assert generate(url, reply["fingerprint"]) != before
    status, reply = post(url, "/load-weights", {
        "model": {"spec": "base", "path": str((tiny / "model").resolve())},
        "fingerprint": identity["fingerprint"]})
    assert status == 200 and reply["weight_loads"] == identity["weight_loads"] + 2
    assert generate(url, identity["fingerprint"]) == before
