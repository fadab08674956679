"""`cltvit-serve --variant auto` (the default): one worker resolves it itself (keeping the chosen session); several get
one choice made before they start; an explicit variant wins; the choice on /info over real HTTP and as one INFO line
in the server's log."""
from __future__ import annotations

import pytest
import requests

from bundle.gate import passes_gate
from bundle import load_bundle
from serving.choice import VariantChoice
from serving.cli import build_parser, running_server, validate_args
from serving.settings import ServeSettings


def _env(bundle, *args: str) -> dict[str, str]:
    parser = build_parser()
    return validate_args(parser, parser.parse_args(["--bundle", str(bundle), "--threads", "1", *args]))


def test_auto_is_resolved_before_the_workers_and_handed_to_them(gated_bundle):
    root, _ = gated_bundle
    m, _ = load_bundle(root)
    assert _env(root)["CLTVIT_VARIANT"] == "auto" and "CLTVIT_VARIANT_CHOICE" not in _env(root)  # one worker: it chooses
    env = _env(root, "--max-batch-size", "4", "--variant-bench-s", "0", "--workers", "2")
    choice = VariantChoice.model_validate_json(env["CLTVIT_VARIANT_CHOICE"])
    assert choice.requested == "auto" and env["CLTVIT_VARIANT"] == choice.variant != "int8-clt"
    assert choice.variant == "fp32" or passes_gate(m.variant_gate(choice.variant))
    assert choice.batch_sizes == [1, 4] and choice.rounds == 1  # a zero budget still times one round
    settings = ServeSettings.from_env(env)  # what a worker reads
    assert settings.variant == choice.variant and settings.variant_choice == choice


def test_explicit_variant_wins(gated_bundle):
    root, _ = gated_bundle
    env = _env(root, "--variant", "int8-clt")
    choice = VariantChoice.model_validate_json(env["CLTVIT_VARIANT_CHOICE"])
    assert env["CLTVIT_VARIANT"] == "int8-clt" and choice.requested == "int8-clt" and choice.rounds == 0
    assert "asked for explicitly; fails the gate" in choice.reason
    with pytest.raises(SystemExit):
        _env(root, "--variant", "int4")


@pytest.mark.slow  # starts a server (~5 s)
def test_info_endpoint_shows_the_choice_over_http(gated_bundle, tmp_path):
    root, gate = gated_bundle
    log = tmp_path / "server.log"
    with running_server(root, log_path=log, extra_args=["--threads", "1", "--max-batch-size", "8"]) as url:
        info = requests.get(f"{url}/info", timeout=60).json()
    choice = info["variant_choice"]
    assert choice["requested"] == "auto" and info["variant"] == choice["variant"] != "int8-clt"
    assert choice["batch_sizes"] == [1, 8] and choice["rounds"] >= 1
    cands = {c["variant"]: c for c in choice["candidates"]}
    assert set(cands) == set(gate.variants) >= {"fp32", "int8", "int8-clt", "fp16"} and cands["int8-clt"]["gated"] is False
    assert cands["int8-clt"]["score"] is None  # never timed
    text = log.read_text()
    assert f"cltvit: serving variant {info['variant']} (auto: " in text  # the worker's INFO line, with the figures
    assert "int8-clt: fails the gate: agreement" in text
