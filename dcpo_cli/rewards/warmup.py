"""Preloaded by the verifier pool's fork server (`pool.FORKSERVER_PRELOAD`): one
throw-away check builds math-verify's parsers and sympy's caches there (about 0.25 s), so
every worker forked from the server starts warm instead of paying it again on its first
response, in every `verify_batch` call (each `dcpo run` step starts a fresh pool)."""

import logging

from dcpo_cli.rewards import check_answer

logging.getLogger("math_verify").setLevel(logging.ERROR)
try:
    WARMED = check_answer("\\frac{1}{2}", "0.5")
except Exception:  # a failed warm-up costs only the time it would have saved
    WARMED = False
