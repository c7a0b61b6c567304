"""A simulated two-node Ray cluster (one CPU each) with the OpenAI app on Ray Serve, for tests marked ``ray``.

Everything stays on this machine and is torn down by the fixtures: the
cluster's own processes (``cluster.shutdown()``, never ``ray stop``, which
would stop every Ray process here), in its own ``RAY_TMPDIR``, without the
dashboard, with token auth off so nothing is written to ``~/.ray``. Serve's
proxy listens on 127.0.0.1 at a free port (it binds with SO_REUSEPORT, so a
fixed port could silently share traffic with another run).

Without Ray installed these tests are not collected (the core CI step);
``.ci/ray.sh`` installs the ``[ray]`` extra and runs them.
"""

import importlib.util
import os
import socket
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

collect_ignore_glob = [] if importlib.util.find_spec("ray") else ["test_*.py"]

NODE = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Two Ray nodes of one CPU each, and this process connected as the driver."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    token = Path.home() / ".ray" / "auth_token"
    token_existed = token.exists()
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_memory_monitor_refresh_ms",
                                                  "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_worker_niceness")}
    # Short path: Ray's unix sockets live under it (108-byte limit).
    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's OOM killer judges the whole machine's memory, which other work on a shared box fills.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    # Ray lowers its workers (Serve's controller, proxy, replicas) to niceness 15: beside any process of normal
    # priority (another CI step, another job on a shared machine) they get almost no CPU, and what takes Serve
    # seconds takes minutes (the CLI once had not stopped 120 s after Ctrl-C; with two busy processes beside it,
    # its app was not up after 180 s). The workers inherit this variable from the nodes started below.
    os.environ["RAY_worker_niceness"] = "0"
    # Serve kills a proxy not ready within 5 s and the serve.start() waiting on it fails: a loaded 2-core
    # machine takes longer to start its Python worker and import uvicorn (the workers inherit this variable).
    os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert token_existed or not token.exists(), "the test cluster left ~/.ray/auth_token behind"


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Serve started on the cluster, its HTTP proxy on 127.0.0.1 (head node only)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return f"http://127.0.0.1:{port}"


def scaled_app(model_dir: str, **scale):
    """The app with 2 tiny replicas, one per node (0.75 CPU each), quick health checks and shutdown."""
    from modelscope_llama2.serving.config import ServerConfig
    from modelscope_llama2.serving.ray import EngineSpec, ScaleSpec, build_application

    settings = {"replicas": 2, "replica_cpus": 0.75, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1,
                **scale}
    # One request generating at a time per replica: the others wait inside it, not yet streaming.
    engine = EngineSpec(model_dir, device="cpu", max_concurrent=1)
    return build_application(engine, ServerConfig(MODEL), ScaleSpec(**settings))


def replica_requests(metrics_text: str) -> Dict[Tuple[str, str], float]:
    """``{(replica id, rank): finished requests}`` from the app's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.labels["replica"], sample.labels["rank"]): sample.value
            for family in text_string_to_metric_families(metrics_text)
            if family.name == "modelscope_llama2_replica_requests"
            for sample in family.samples if sample.name.endswith("_total")}


def metric_value(metrics_text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(metrics_text) if family.name == name
               for sample in family.samples if sample.name.endswith("_total"))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
