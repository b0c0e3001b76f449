"""The examples the README's "Extending dcpo" points to run as documented."""

from __future__ import annotations

from pathlib import Path

from builders import write_rollouts

from dcpo_cli.files import contracts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_three_level_reward_example_scores_through_the_cli(tmp_path, dcpo):
    responses = ["so \\boxed{7}", "\\boxed{8}", "no box at all", "\\boxed{7} but cut"]
    path = write_rollouts(tmp_path / "r.parquet", responses, ["7"] * 4, lengths=[4, 4, 4, 16],
                          max_new_tokens=16)
    result = dcpo("score", path, "--out", tmp_path / "s.parquet", "--reward",
                  "three_level:reward", cwd=EXAMPLES / "rewards")
    assert result.code == 0, result.stderr
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    # right, boxed but wrong, no box, truncated (docs/design.md 1.4)
    assert scored.column("reward").to_pylist() == [1.0, 0.0, -1.0, -1.0]
    assert scored.column("correct").to_pylist() == [True, False, False, False]
