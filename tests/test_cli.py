from __future__ import annotations

import pytest

from receiver import cli
from receiver.client import ClientError


def test_refused_parameters_are_listed_field_by_field(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    body = {"error": {"code": "invalid_parameters", "message": "Invalid parameters: resolution, n.",
                      "details": {"fields": [{"field": "resolution", "message": "with aspect_ratio auto, only 1K"},
                                             {"field": "n", "message": "must be one of: 1"}]}}}

    def refused(args) -> int:
        raise ClientError("invalid_parameters: Invalid parameters: resolution, n.", status=400, body=body)

    monkeypatch.setattr(cli, "run_submit", refused)
    assert cli.main(["submit", "--provider", "xenodia", "--model", "gpt-image-2", "--prompt", "p"]) == 1
    assert capsys.readouterr().err.splitlines()[1:] == ["  resolution: with aspect_ratio auto, only 1K",
                                                        "  n: must be one of: 1"]
