"""Backbone loading: project configs, clear errors for unknown names, tags and unreachable weight hubs.

No test here touches the network: the offline case blocks every connection of the process.
"""
from __future__ import annotations

import socket

import pytest
import torch

from training.model.backbone import BackboneError, _hub_reachable, load_backbone, pick_device


def test_unknown_architecture_is_named():
    with pytest.raises(BackboneError, match="unknown open_clip architecture 'ViT-Nope'"):
        load_backbone("ViT-Nope")


def test_unknown_tag_lists_known_ones():
    with pytest.raises(BackboneError, match="neither a file nor a known tag.*openai"):
        load_backbone("ViT-B-32", "no-such-tag")


@pytest.fixture()
def no_network(monkeypatch):
    """Every outgoing connection from this process fails as on an offline machine (and none is made)."""
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable (blocked by the test)")

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return attempts


def test_pretrained_tag_offline_says_how_to_supply_weights(no_network):
    assert not _hub_reachable()  # the reachability check sees the blocked network
    with pytest.raises(BackboneError) as err:
        load_backbone("ViT-B-32", "openai")
    msg = str(err.value)
    assert "ViT-B-32/openai" in msg and "file path as --pretrained" in msg
    assert err.value.__cause__ is None  # no stack trace from deep inside the hub client
    # only the cheap reachability probes were tried; the hub client was told to stay offline
    assert no_network and set(no_network) == {"huggingface.co"}, no_network


def test_same_seed_same_fingerprint_other_seed_differs():
    a = load_backbone("cltvit-tiny", seed=0).fingerprint
    assert a == load_backbone("cltvit-tiny", seed=0).fingerprint
    assert a != load_backbone("cltvit-tiny", seed=1).fingerprint


@pytest.mark.parametrize("has_cuda", [False, True])
def test_pick_device_uses_cuda_exactly_when_present(monkeypatch, has_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert pick_device() == torch.device("cuda" if has_cuda else "cpu")
    assert pick_device("cpu") == torch.device("cpu")  # asked for: never overridden
    if has_cuda:
        assert pick_device("cuda:1") == torch.device("cuda:1")
    else:
        with pytest.raises(BackboneError, match="device 'cuda:1' was requested but CUDA is not available"):
            pick_device("cuda:1")


def test_pick_device_on_this_machine():
    assert pick_device().type == ("cuda" if torch.cuda.device_count() > 0 else "cpu")
