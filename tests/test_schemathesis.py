"""schemathesis against /openapi.json of a running gateway (sim model servers): 0 failures.

schemathesis runs as its CLI in a subprocess (its pytest plugin imports ssl before conftest
monkey-patches, so the plugin stays off: see pyproject.toml's addopts). The gateway runs in
this process, served by this hub while the subprocess drives it; it requires an API key, so
schemathesis's ``ignored_auth`` check also tries every operation without one.

One check is left out, ``positive_data_acceptance``: the upload's schema is "bytes", and no
schema can say "bytes that decode to an image", so schema-valid bytes that are not an image
rightly get the documented 400 invalid_image.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SimGateway

from chaoqing.config import Limits

pytestmark = pytest.mark.timeout(600)

API_KEY = "schemathesis-key"
MAX_EXAMPLES = 60


@pytest.mark.slow
def test_schemathesis_finds_no_failures(start_sim_gateway: Callable[..., SimGateway], tmp_path: Path) -> None:
    gateway = start_sim_gateway(upscale_ms=2, detect_ms=1, face_ms=2, faces=1, api_keys=(API_KEY,),
                                limits=Limits(max_body_bytes=4_000_000, max_input_pixels=4_000_000, max_output_pixels=16_000_000))
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{gateway.url}/openapi.json",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", str(MAX_EXAMPLES), "--seed", "20261128", "--workers", "1",
        "--generation-database", "none", "--request-timeout", "60", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path, check=False)
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert "failures" not in summary.splitlines()[-1] or " 0 failures" in summary.splitlines()[-1], summary
    assert "Operations:" in result.stdout and "0 selected" not in result.stdout
    assert gateway.server.gateway.in_flight == 0
