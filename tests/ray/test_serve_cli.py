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


def test_serve_replicas_joins_a_running_cluster(ray_cluster, tiny_dir, tmp_path):
    from ray import serve

    serve.shutdown()  # the CLI starts Serve itself, its proxy on the port it is given
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    command = [sys.executable, "-m", "modelscope_llama2", "serve", "--model", tiny_dir, "--served-model-name",
               "tiny", "--replicas", "2", "--replica-cpus", "0.5", "--ray-address", ray_cluster.address,
               "--port", str(port), "--api-key", "sk-test"]
    cli = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            output = (tmp_path / "serve.log").read_text()
            assert cli.poll() is None, output[-3000:]
            return f"serving tiny on {url}/v1 with 2 replica(s)" in output

        wait_for(ready, 180, "the CLI to report its application ready")
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                               max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):  # the API key covers the scaled-out app too
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        cli.send_signal(signal.SIGINT)
        returncode = cli.wait(timeout=120)
        log.close()
    assert returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    # It removed its application and left the cluster it joined running.
    assert APP_NAME not in serve.status().applications
