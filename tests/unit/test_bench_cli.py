"""`python -m bench` options: repeats, soak length, stage names."""

from __future__ import annotations

import pytest

from bench.__main__ import STAGE_HELP, STAGE_NAMES, _stages, parse_args


def test_every_stage_has_help_and_a_function() -> None:
    assert set(STAGE_NAMES) == set(STAGE_HELP) == set(_stages())
    assert {"burst", "storm", "soak"} <= set(STAGE_NAMES)


def test_repeats_and_soak_options() -> None:
    args = parse_args(["--repeats", "5", "--stage", "e2e"])
    assert args.repeats == 5 and args.stage == ["e2e"]
    assert parse_args([]).repeats is None  # 3, or 1 with --quick, decided in main()
    assert parse_args(["--long-soak"]).soak_seconds == 3600.0
    assert parse_args(["--soak-seconds", "600"]).soak_seconds == 600.0
    assert parse_args(["--storm-agents", "2000"]).storm_agents == 2000


@pytest.mark.parametrize(
    "argv", [["--repeats", "0"], ["--soak-seconds", "5"], ["--storm-agents", "1"], ["--stage", "nope"]])
def test_bad_options_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err
