"""The official DCPO recipe's three-level reward (docs/design.md 1.4), as a `--reward`
function: +1 for a correct final \\boxed{} answer, 0 for a boxed but wrong one, -1 for a
response with no boxed answer or one cut off at --max-new-tokens.

    cd examples/rewards && dcpo score ROLLOUTS --out SCORED --reward three_level:reward

(or put this folder on PYTHONPATH). The same reward is built in: `dcpo score ROLLOUTS --out
SCORED --no-answer-reward -1` gives identical rewards (tests/test_score.py checks it) and
records each response's level in the `reward_level` column; this file shows how such a
reward is written as your own function. `dcpo score` calls it once per response, in its worker
pool, with the response's text, the gold answer and the whole rollouts row as a dict.
"""

from dcpo_cli.rewards import check_answer, extract_boxed


def reward(response_text: str, answer: str, row: dict) -> float:
    boxed = extract_boxed(response_text)
    if boxed is None or row.get("finish_reason") == "length":
        return -1.0
    return 1.0 if check_answer(boxed, answer) else 0.0
