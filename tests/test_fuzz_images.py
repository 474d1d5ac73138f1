"""Structure-aware fuzzing of fvd and fvd.qcow2 images (tests/fuzzlib.py).

CI runs a few hundred cases per image kind and implementation; a soak run sets
FVD_FUZZ_CASES (cases per kind and implementation) and optionally FVD_FUZZ_SEED:

    FVD_FUZZ_CASES=50000 FVD_FUZZ_SEED=$RANDOM python -m pytest -q tests/test_fuzz_images.py
"""

import json
import os

import pytest

from .fuzzlib import run_fuzz

CASES = {"fvd": 400, "qcow2": 250}


@pytest.mark.parametrize("kind", ["fvd", "qcow2"])
def test_fuzz_images(kind, impl):
    cases = int(os.environ.get("FVD_FUZZ_CASES", CASES[kind]))
    seed = int(os.environ.get("FVD_FUZZ_SEED", "0")) * 2 + (impl == "python")
    env = dict(os.environ)
    env.pop("FVD_PURE_PYTHON", None)
    if impl == "python":
        env["FVD_PURE_PYTHON"] = "1"
    failures = run_fuzz(kind, cases, seed=seed, env=env)
    report = "\n".join(json.dumps(f)[:2000] for f in failures[:5])
    assert not failures, (
        f"{len(failures)} of {cases} {kind} cases failed (seed {seed}; "
        f"reproduce with python -m tests.fuzzlib worker {kind} {seed} "
        f"CASE 1):\n{report}"
    )
