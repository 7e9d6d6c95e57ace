# -- pipeline fixtures (tests/test_pipeline*.py): real servers on free loopback ports, stopped by PID ---------------
import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking + registry server (sqlite, local artifacts, webhooks enabled) for the session."""
    pytest.importorskip("mlflow")
    from pipeline_support import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


# -- model zoo fixtures (tests/test_zoo.py; anyone who needs real RL-trained checkpoints) ---------------------------
@pytest.fixture(scope="session")
def tiny_family() -> dict:
    """The tiny RLVR family, built once per machine and cached: an SFT base and GRPO specialists math_s0, math_s1,
    code_s0, code_s1 (bf16 HF checkpoints), calib_math.jsonl / calib_code.jsonl.

    Returns its family.json as a dict, with `root` = the family directory. The first build takes ~1–3 min on 2 cores;
    later sessions reuse the cache ($SARMERGE_ZOO_CACHE, default ~/.cache/sarmerge/zoo/<hash of code + config>).
    The directory is shared: treat it as read-only (copy what you need to modify).
    """
    import logging
    import time

    from sarmerge.zoo.family import build_tiny_family

    t0 = time.perf_counter()
    family = build_tiny_family(progress=False)
    logging.getLogger("tests.zoo").info("tiny family ready in %.1fs at %s (built in %.1fs)", time.perf_counter() - t0,
                                        family["root"], family["timings_s"]["total"])
    return family
