"""Schemathesis against the server's own ``/openapi.json``: no 5xx, and every answer matches the document.

Generated requests, valid and invalid (wrong types, missing fields, huge
numbers, odd strings), go to a real server on 127.0.0.1 over the tiny
checkpoint. Bounded: a fixed number of examples per operation and a time budget.
"""

import os
import subprocess

import httpx

from modelscope_llama2.serving.server import build_app
from tests.helpers import running_server

KEY = "sk-schemathesis"


def test_generated_requests_get_no_server_error_and_conform_to_the_schema(tiny_dir, tmp_path):
    app = build_app(tiny_dir, "tiny", api_key=KEY, max_running=2, max_waiting=64)
    with running_server(app) as url:
        schema = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
        report = tmp_path / "report.json"
        run = subprocess.run(
            [os.environ["MODELSCOPE_LLAMA2_SCHEMATHESIS"], "run", url + "/openapi.json",
             "-H", f"Authorization: Bearer {KEY}",
             "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
             # max_tokens kept small by the examples' size: generation is bounded by --max-time too.
             "--max-examples", "40", "--max-time", "150", "--seed", "19", "--request-timeout", "60",
             "--phases", "examples,coverage,fuzzing", "--report", "json", "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        # The server stayed whole: it still answers.
        assert httpx.get(url + "/health").status_code == 200
