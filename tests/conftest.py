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
