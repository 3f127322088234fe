"""Numerics: the engines' setting is applied once and recorded; the reference's is applied around its calls."""

import os

import torch

from engines.numerics import NUMERICS, REFERENCE_NUMERICS, applied, configure_process, record


def test_production_numerics_are_torch_defaults_with_tf32_off(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure_process(NUMERICS["production"])
    state = record(NUMERICS["production"])
    assert state["name"] == "production" and state["deterministic_algorithms"] is False
    assert state["tf32"] is False and state["cublas_workspace_config"] is None
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # production leaves the process's cuBLAS alone


def test_the_reference_setting_holds_inside_its_block_only():
    configure_process(NUMERICS["production"])
    with applied(REFERENCE_NUMERICS):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_numerics_fix_the_cublas_workspace_before_any_handle(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        configure_process(NUMERICS["deterministic"])
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert record(NUMERICS["deterministic"])["deterministic_algorithms"] is True
    finally:
        configure_process(NUMERICS["production"])
