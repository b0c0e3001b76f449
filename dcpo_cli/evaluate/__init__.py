"""dcpo eval: benchmarks, sampling, avg/pass/maj@k."""
