"""Helpers of the kernel tests: the interpreter child, and a few GPU SGD steps to compare two ways of running a net."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def run_interpreted_tests(test_file: str, expected_passed: int) -> None:
    """Run the ``test_interpreted_*`` tests of ``test_file`` in a child pytest started with TRITON_INTERPRET=1
    (Triton fixes interpreted or compiled mode when it is first imported) and check that all of them passed."""
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", "-k", "interpreted"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == expected_passed, output
    assert "skipped" not in result.stdout.splitlines()[-1], output


def sgd_losses(net: nn.Module, step_model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 5):
    """Losses of ``steps`` SGD steps (lr 0.05, momentum 0.9) through ``step_model`` (``net`` or a compiled ``net``)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(step_model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
