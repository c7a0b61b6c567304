"""``python -m modelscope_llama2 serve --replicas N``: settings checked up front, and a CLI that joins a cluster.

Runs after ``test_scale_out.py`` (it replaces that module's Serve instance
with the one the CLI starts on its own port).
"""

import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from modelscope_llama2.serving.ray import APP_NAME, ScaleSpec
from tests.helpers import assert_drained, signal_with_streams_in_flight
from tests.ray.conftest import free_port, wait_for

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("settings, field", [
    ({"replicas": 0}, "replicas"),
    ({"replicas": 2, "min_replicas": 3, "max_replicas": 4}, "replicas"),
    ({"replicas": 2, "max_replicas": 0}, "max_replicas"),
    ({"replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests"),
    ({"replicas": 2, "replica_cpus": -1}, "replica_cpus"),
    ({"replicas": 2, "router": "round-robin"}, "router"),
    ({"replicas": 2, "imbalance": 0}, "imbalance"),
])
def test_bad_scale_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ScaleSpec(**settings)


def test_autoscaling_settings_pass_to_ray_serve():
    from ray.serve.config import RequestRouterConfig

    fixed = ScaleSpec(replicas=3, replica_cpus=0.5).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert isinstance(fixed["request_router_config"], RequestRouterConfig)
    assert fixed["request_router_config"].request_router_kwargs == {"imbalance": 4}
    scaled = ScaleSpec(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=3).deployment_options()
    assert scaled["autoscaling_config"] == {"initial_replicas": 2, "min_replicas": 1, "max_replicas": 4,
                                            "target_ongoing_requests": 3}
    assert "num_replicas" not in scaled
    assert "request_router_config" not in ScaleSpec(replicas=2, router="default").deployment_options()


def test_ray_flags_need_replicas():
    run = subprocess.run([sys.executable, "-m", "modelscope_llama2", "serve", "--ray-address", "auto"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == \
        "error: --ray-address: only applies with --replicas N (scale-out on Ray Serve)"


DRAIN_S = 2
KEY_HEADER = {"Authorization": "Bearer sk-test"}


def launch(cluster, model_dir, tmp_path):
    """``serve --replicas 2`` joining the test cluster, a 2 s drain: ``(url, process, log path)``, just started."""
    from ray import serve

    serve.shutdown()  # the CLI starts Serve itself, its proxy on the port it is given
    port = free_port()
    path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "modelscope_llama2", "serve", "--model", model_dir, "--served-model-name",
               "tiny", "--replicas", "2", "--replica-cpus", "0.5", "--ray-address", cluster.address,
               "--port", str(port), "--api-key", "sk-test", "--drain-timeout", str(DRAIN_S)]
    with open(path, "w") as log:
        cli = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    return f"http://127.0.0.1:{port}", cli, path


@pytest.fixture
def serve_cli(ray_cluster, tiny_dir, tmp_path):
    """The CLI of :func:`launch`, its application ready."""
    url, cli, path = launch(ray_cluster, tiny_dir, tmp_path)
    try:
        def ready():
            assert cli.poll() is None, path.read_text()[-3000:]
            return f"serving tiny on {url}/v1 with 2 replica(s)" in path.read_text()

        wait_for(ready, 180, "the CLI to report its application ready")
        yield url, cli, path
    finally:
        if cli.poll() is None:  # not stopped by the test (it failed): no Ctrl-C, whose wait would hide why
            cli.kill()
            cli.wait(30)


def app_deployed():
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return APP_NAME in serve.status().applications
    except RayServeException:  # no Serve instance at all
        return False


def test_serve_replicas_joins_a_running_cluster_and_drains_on_ctrl_c(serve_cli):
    url, cli, log = serve_cli
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):  # the API key covers the scaled-out app too
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    bodies, code, exited = signal_with_streams_in_flight(url, cli, signal.SIGINT, KEY_HEADER)
    assert code == 0, log.read_text()[-3000:]
    assert_drained(bodies)
    # A bound against hangs (Serve's own shutdown takes a few seconds more on a loaded machine), not a timing.
    assert exited < DRAIN_S + 60, log.read_text()[-3000:]
    # It removed its application and left the cluster it joined running.
    assert not app_deployed()


def test_sigterm_drains_the_replicas_streams_and_exits_cleanly(serve_cli):
    url, cli, log = serve_cli
    bodies, code, exited = signal_with_streams_in_flight(url, cli, signal.SIGTERM, KEY_HEADER)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert_drained(bodies)
    # Issue 19 asks for an exit within the drain timeout + 5 s: 4.8-4.9 s here with a 2 s drain (7.0-7.4 s while
    # Serve polled its stopping replicas every 2 s). The bound is against hangs, with room for a loaded CI machine.
    assert exited < DRAIN_S + 10, log.read_text()[-3000:]


def test_ctrl_c_while_starting_exits_cleanly(ray_cluster, tiny_dir, tmp_path):
    # Ctrl-C as Serve starts: the command used to ask Serve to delete its app with no controller up yet (a
    # traceback and status 1), or to block on a controller still starting.
    _, cli, log = launch(ray_cluster, tiny_dir, tmp_path)
    try:
        wait_for(lambda: "Connected to Ray cluster" in log.read_text(), 120, "the CLI to join the cluster")
        cli.send_signal(signal.SIGINT)
        code = cli.wait(60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(30)
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not app_deployed()
