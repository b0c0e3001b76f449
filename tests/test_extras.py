"""Every option that needs an optional extra, with the extra's package missing (blocked as
Python blocks it: None in sys.modules): one line naming the extra to install, exit 2, and
nothing written."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

from dcpo_cli.cli import run
from dcpo_cli.extras import EXTRAS, installed

# extra -> command lines that need it; {tmp} is the test's folder, {model} a model directory,
# {lora} a LoRA checkpoint. Whatever a command would write lies under {tmp}/out.
NEEDS = {
    "lora": [
        "train-step --model {model} --scored {tmp}/s.parquet --state {tmp}/out/state.json "
        "--out {tmp}/out/ckpt --lora-rank 4",
        "run {tmp}/out/run --lora-rank 4",
        "export {lora} --out {tmp}/out/merged",
    ],
    "vllm": [
        "run {tmp}/out/run --engine vllm",
        "rollout --model {model} --prompts {tmp}/p.parquet --step 0 --out {tmp}/out/r.parquet "
        "--engine vllm",
        "eval --model {model} --benchmark aime24 --out {tmp}/out/eval --engine vllm",
        "serve --model {model} --engine vllm --url-file {tmp}/out/url",
    ],
    "hub": [
        "prepare owner/dataset --out {tmp}/out/prompts.parquet",
        "eval --model {model} --benchmark owner/dataset --out {tmp}/out/eval --engine hf",
    ],
    **{tracker: [
        "train-step --model {model} --scored {tmp}/s.parquet --state {tmp}/out/state.json "
        f"--out {{tmp}}/out/ckpt --report-to {tracker}",
        f"run {{tmp}}/out/run --report-to {tracker}",
        f"eval --model {{model}} --benchmark aime24 --out {{tmp}}/out/eval --report-to {tracker}",
    ] for tracker in ("tensorboard", "wandb", "trackio", "mlflow")},
}


def test_every_extra_of_pyproject_is_known():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRAS) == set(extras) - {"dev"} == set(NEEDS)
    for extra, module in EXTRAS.items():  # the module is the one the extra installs
        assert any(r.startswith(module) for r in extras[extra]), (extra, extras[extra])


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, random_model_dir) -> Path:
    """A LoRA checkpoint as far as its config goes (the weights are never reached)."""
    folder = tmp_path_factory.mktemp("lora") / "ckpt"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(random_model_dir), "r": 4,
        "lora_alpha": 32, "target_modules": ["q_proj"]}))
    return folder


@pytest.mark.parametrize(("extra", "command"), [(extra, command) for extra, commands in
                                                NEEDS.items() for command in commands])
def test_a_missing_extra_is_one_line_naming_it(extra, command, tmp_path, random_model_dir,
                                               lora_checkpoint, monkeypatch, capsys):
    module = EXTRAS[extra]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` -> ImportError
    assert not installed(module)
    argv = command.format(tmp=tmp_path, model=random_model_dir, lora=lora_checkpoint).split()
    code = run(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"needs the {extra} extra" in lines[0] and f"pip install 'dcpo-cli[{extra}]'" in \
        lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_an_installed_extra_passes(monkeypatch):
    from dcpo_cli.extras import require

    monkeypatch.setitem(sys.modules, "peft", object())  # present, whatever it is
    require("lora", "--lora-rank")
