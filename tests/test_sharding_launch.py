"""The model split across processes under ``mlx.launch --backend ring`` (on 127.0.0.1) against one process:
logits (float32, rel <= 1e-5, in one call and in cached steps; float, 4-bit and mxfp4 checkpoints), greedy
tokens for a text and an image prompt, seeded samples (every process takes process 0's token), and what each
process holds. Tensor parallelism on 2 and 4 processes, pipeline parallelism on 3 (layers split by memory); the
command line prints once, and refuses a process count that does not divide the model.

Each configuration is one launch of ``sharding_worker.py``: seconds of start-up per process, and many small
collectives, slow where the processes outnumber the cores.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import PARITY, rel_err
from mlx_llama4 import load
from sharding_checkpoints import IMAGE_PROMPT, TEXT_PROMPT, token_ids, write_checkpoints
from sharding_worker import STEPS, parameter_bytes

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
WORKER = Path(__file__).parent / "sharding_worker.py"
TIMEOUT = 600  # seconds per launch; a few seconds of work, minutes on a loaded 2-core machine
MAX_TOKENS = 8
CHECKPOINTS = ("float", "q4", "mxfp4")
# configuration -> (processes, parallel mode, checkpoints). Pipeline: mxfp4's embeddings are bfloat16 where
# the layers compute in float32, which the transfers between processes must follow.
CONFIGS = {"tensor-2": (2, "tensor", CHECKPOINTS), "tensor-4": (4, "tensor", ("float", "q4")),
           "pipeline-3": (3, "pipeline", ("float", "mxfp4"))}


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1 (mlx.launch's ring takes one per process)."""
    for _ in range(100):
        start = random.randrange(20000, 60000)
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(n: int, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``command`` run by ``n`` processes under ``mlx.launch --backend ring`` on this machine. Its standard input
    stays open and empty: at the end of its input, mlx.launch would poll it in a busy loop."""
    args = [str(MLX_LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_ports(n)), "--",
            *command]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:  # timed out: end the launcher and the processes it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdin.close()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, out.read().decode(), err.read().decode())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding-launch")
    paths = write_checkpoints(root)
    np.save(root / "ids.npy", token_ids())
    return root, paths


@pytest.fixture(scope="module")
def image_file(checkpoints):
    from real_vocab import random_image

    path = checkpoints[0] / "picture.png"
    random_image().save(path)
    return path


def generation_spec(image_file) -> dict:
    return {"text": TEXT_PROMPT, "image_prompt": IMAGE_PROMPT, "image": str(image_file), "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def one_process(checkpoints, image_file):
    """What one process computes, per checkpoint: logits in one call and in steps, bytes by kind, tokens."""
    from sharding_worker import token_runs

    root, paths = checkpoints
    ids = np.load(root / "ids.npy")
    out = {}
    for name in CHECKPOINTS:
        model, processor = load(paths[name], dtype=mx.float32)
        cache, pieces, pos = model.make_cache(), [], 0
        for n in STEPS:
            pieces.append(np.array(model(mx.array(ids[:1, pos : pos + n]), cache=cache)))
            pos += n
        out[name] = {"full": np.array(model(mx.array(ids))), "steps": np.concatenate(pieces, axis=1),
                     "bytes": parameter_bytes(model)}
        if name == "float":
            mx.random.seed(1000)  # process 0's seed in the sharded run
            out[name]["tokens"] = token_runs(model, processor, generation_spec(image_file))
    return out


def command_line(model, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", TEXT_PROMPT, "--max-tokens", str(MAX_TOKENS),
            "--temp", "0", *extra]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def sharded(request, checkpoints, image_file, tmp_path_factory):
    """One launch per configuration: (name, processes, mode, checkpoints, per-rank results, output folder,
    the launch's standard output and error). Tensor on 2 also runs the command line (it must print once),
    pipeline on 3 the command line in tensor mode (3 processes cannot share 8 heads)."""
    n, mode, names = CONFIGS[request.param]
    root, paths = checkpoints
    out = tmp_path_factory.mktemp(request.param)
    lines = {"tensor-2": [command_line(paths["float"])],
             "pipeline-3": [command_line(paths["float"], "--parallel", "tensor")]}.get(request.param, [])
    spec = {"parallel": mode, "ids": str(root / "ids.npy"), "generation": generation_spec(image_file),
            "checkpoints": [{"name": c, "path": str(paths[c]), "generate": c == "float"} for c in names],
            "command_lines": lines}
    (out / "spec.json").write_text(json.dumps(spec))
    proc = launch(n, [sys.executable, str(WORKER), str(out / "spec.json"), str(out)], cwd=WORKER.parent)
    files = [out / f"rank{r}.json" for r in range(n)]
    # mlx.launch exits with 0 even when a process failed: each process's file says it finished
    assert proc.returncode == 0 and all(f.exists() for f in files), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in files]
    return request.param, n, mode, names, ranks, out, proc


def test_logits_equal_one_process(sharded, one_process):
    config, n, _, names, _, out, _ = sharded
    for name in names:
        for r in range(n):
            for kind in ("full", "steps"):
                got = np.load(out / f"{name}-rank{r}-{kind}.npy")
                assert rel_err(got, one_process[name][kind]) <= PARITY, (config, name, r, kind)


def test_tokens_equal_one_process(sharded, one_process):
    """Greedy text and image replies, and samples: process 0's seed is the one-process run's, the others are
    seeded differently, so every process keeps the same tokens only by taking process 0's."""
    config, _, _, _, ranks, _, _ = sharded
    expected = one_process["float"]["tokens"]
    assert all(len(tokens) == MAX_TOKENS for tokens in expected.values())
    for rank in ranks:
        assert rank["checkpoints"]["float"]["tokens"] == expected, (config, rank["rank"])


def test_each_process_holds_its_share(sharded, one_process):
    """Tensor: 1/N of the attention, experts and MLPs, the rest whole; pipeline: each layer on one process; both:
    what is outside the layers whole, and loading peaks at the share plus at most one tensor."""
    config, n, mode, names, ranks, _, _ = sharded
    split = ("attention", "experts", "mlp")
    for name in names:
        whole = one_process[name]["bytes"]
        shares = [rank["checkpoints"][name] for rank in ranks]
        for share in shares:
            assert share["bytes"]["outside"] == whole["outside"], (config, name)
            if mode == "tensor":
                assert {k: share["bytes"][k] * n for k in split} == {k: whole[k] for k in split}, (config, name)
                assert share["bytes"]["layer_rest"] == whole["layer_rest"], (config, name)
            assert share["load_peak"] <= sum(share["bytes"].values()) + max(whole.values()), (config, name, share)
        if mode == "pipeline":
            for kind in split + ("layer_rest",):
                assert sum(share["bytes"][kind] for share in shares) == whole[kind], (config, name)
            assert sum(s["cache_layers"] for s in shares) == 4 and all(s["cache_layers"] for s in shares)


def test_command_line_prints_once_or_refuses_a_count_that_does_not_divide(sharded, checkpoints, capsys):
    from mlx_llama4.cli import main

    config, n, _, _, ranks, _, proc = sharded
    if config == "tensor-2":
        assert [rank["exit_codes"] for rank in ranks] == [[0]] * n
        assert main(command_line(checkpoints[1]["float"])) == 0  # the same command in this one process
        reply = capsys.readouterr().out.split("\n[prompt:")[0]
        assert reply.strip() and proc.stdout.count("[prompt:") == 1, proc.stdout
        assert proc.stdout.startswith(reply + "\n[prompt:"), (reply, proc.stdout)
    elif config == "pipeline-3":
        assert [rank["exit_codes"] for rank in ranks] == [[2]] * n  # a usage error, in every process
        assert ("cannot split this model across 3 processes by tensor parallelism: num_attention_heads = 8"
                in proc.stderr)
        assert "[prompt:" not in proc.stdout
    else:
        pytest.skip("no command line in this configuration")
