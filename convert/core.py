"""The converter: any supported Llama 4 checkpoint -> an MLX checkpoint (float or quantized), streamed.

Pipeline: resolve the source (local folder or Hub id) -> read shard headers -> plan our tensors from theirs
(``mlx_llama4.weights.plan_layout``) -> check names and shapes against the model the config describes (before
anything is written) -> decide per layer float / quantized (``policy.py``) -> lay the outputs out in shards of at
most ``max_shard_size`` -> write each shard block of rows by block of rows into a hidden temporary folder -> write
the index, config.json, tokenizer / processor files, the source's license files and a model card keeping the
source card's metadata (``side_files.py``) -> rename the folder into place.

Resuming: the temporary folder keeps a state file with a fingerprint of the input and the options, and the size
and hash (``safetensors_io.shard_digest``, computed while writing) of each finished shard. A rerun with the same
input and options keeps the finished shards that still match and writes the rest; anything else starts over. The output folder appears only once complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_llama4.config import ConfigError, ModelConfig, read_config_json
from mlx_llama4.loading import check_shapes, quantize_like_checkpoint, without_absent_vision
from mlx_llama4.model import Model
from mlx_llama4.safetensors_reader import CheckpointReader
from mlx_llama4.weights import CheckpointError, Entry, TensorInfo, plan_layout

from .hub import fetch, upload
from .policy import QuantPolicy, QuantSpec, make_policy
from .safetensors_io import ShardWriter, shard_digest
from .side_files import copy_side_files, model_card, read_card_metadata

FORMAT_VERSION = 1  # bump when the output layout changes, so that old partial outputs are not resumed
ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
STATE_FILE = ".convert-state.json"
BLOCK_BYTES = 128 << 20  # float32 working size of one block of rows


class ConvertError(ValueError):
    """A conversion that cannot run as asked (bad options, an output folder in the way, ...)."""


@dataclass
class ConvertResult:
    path: Path
    shards: list[str]
    shards_reused: int
    bytes_written: int
    quantization: Optional[dict]
    seconds: float


@dataclass
class _Job:
    """One planned entry: what it reads, how the source packed it, what we write."""

    entry: Entry
    source_q: Optional[QuantSpec]
    target_q: Optional[QuantSpec]
    outputs: dict[str, TensorInfo]
    in_dims: Optional[int]
    float_row_bytes: int

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(i) for i in self.outputs.values())


@dataclass
class _Shard:
    name: str
    jobs: list[_Job] = field(default_factory=list)

    @property
    def tensors(self) -> list[tuple[str, TensorInfo]]:
        return [(n, i) for j in self.jobs for n, i in sorted(j.outputs.items())]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def _nbytes(info: TensorInfo) -> int:
    n = info.dtype.size
    for d in info.shape:
        n *= d
    return n


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` (decimal units, as Hugging Face uses), ``4GiB`` (binary) or a plain number."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConvertError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** "BKMGT".index((m[2] or "B").upper()))


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[mlx-llama4 convert] {msg}", file=sys.stderr, flush=True)


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def read_source_config(path: Path) -> tuple[dict, ModelConfig]:
    file, raw = read_config_json(path)
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if (archs and not set(archs) & set(ARCHITECTURES)) or model_type not in ("llama4", "llama4_text"):
        raise ConfigError(
            f"{file}: unknown architecture {', '.join(archs) or '(none given)'} with model_type {model_type!r}; "
            f"this converter handles Llama 4 ({', '.join(ARCHITECTURES)}; model_type 'llama4' or 'llama4_text')"
        )
    try:
        return raw, ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def _source_dtype(raw: dict, jobs: list[_Job]) -> mx.Dtype:
    """The checkpoint's own float dtype: config.json's torch_dtype / dtype, else its most common float dtype."""
    for d in (raw, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if d.get(key) in DTYPES:
                return DTYPES[d[key]]
    counts = Counter(i.dtype for j in jobs if not j.entry.fp8 for i in j.entry.outputs.values()
                     if mx.issubdtype(i.dtype, mx.floating))
    return counts.most_common(1)[0][0] if counts else mx.bfloat16


def _quantized_outputs(name: str, shape: tuple, spec: QuantSpec, dtype: mx.Dtype) -> dict[str, TensorInfo]:
    *lead, in_dims = shape
    prefix = name[: -len(".weight")]
    out = {
        name: TensorInfo((*lead, in_dims * spec.bits // 32), mx.uint32),
        prefix + ".scales": TensorInfo((*lead, in_dims // spec.group_size), dtype if spec.mode == "affine" else mx.uint8),
    }
    if spec.mode == "affine":
        out[prefix + ".biases"] = TensorInfo((*lead, in_dims // spec.group_size), dtype)
    return out


def _plan_jobs(entries, raw_config, config, policy, dequantize, dtype, source) -> tuple[list[_Job], ModelConfig, mx.Dtype]:
    infos = {n: i for e in entries for n, i in e.outputs.items()}
    config = without_absent_vision(config, infos)
    float_model = Model(config)  # lazy: parameters are never evaluated, only their shapes are read
    float_params = dict(tree_flatten(float_model.parameters()))
    modules = dict(float_model.named_modules())
    source_q: dict[str, QuantSpec] = {}
    if any(e.quantized for e in entries):
        q_model = Model(config)
        quantize_like_checkpoint(q_model, config.quantization, infos)
        check_shapes(dict(tree_flatten(q_model.parameters())), infos, source)
        for path, m in q_model.named_modules():
            if hasattr(m, "scales") and hasattr(m, "bits"):
                source_q[path] = QuantSpec(m.group_size, m.bits, m.mode)
    else:
        check_shapes(float_params, infos, source)

    jobs = []
    for e in entries:
        mod_path = e.module
        module = modules.get(mod_path) if mod_path else None
        quantizable = module is not None and hasattr(module, "to_quantized") and e.name == f"{mod_path}.weight"
        in_dims = float_params[e.name].shape[-1] if quantizable else None
        src_q = source_q.get(mod_path) if e.quantized else None
        if policy is not None:
            tgt_q = policy.spec_for(mod_path, in_dims) if quantizable else None
        elif src_q is not None and not dequantize:
            tgt_q = src_q
        else:
            tgt_q = None
        float_shape = float_params[e.name].shape if e.name in float_params else e.outputs[e.name].shape
        row = 4
        for d in float_shape[1:]:
            row *= d
        jobs.append(_Job(e, src_q, tgt_q, {}, in_dims, row))
    seen: dict[str, str] = {}
    for e in entries:
        for n in e.outputs:
            if n in seen:
                raise CheckpointError(f"{source}: {n} would be produced from both {seen[n]} and {e.sources[0]}")
            seen[n] = e.sources[0]
    out_dtype = dtype or _source_dtype(raw_config, jobs)
    for j in jobs:
        if j.target_q is not None:
            j.outputs = _quantized_outputs(j.entry.name, float_params[j.entry.name].shape, j.target_q, out_dtype)
        elif j.source_q is not None:  # dequantized
            j.outputs = {j.entry.name: TensorInfo(tuple(float_params[j.entry.name].shape), out_dtype)}
        else:
            j.outputs = {n: TensorInfo(i.shape, out_dtype if mx.issubdtype(i.dtype, mx.floating) else i.dtype)
                         for n, i in j.entry.outputs.items()}
    return jobs, config, out_dtype


def _transform(job: _Job, arrays: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Source rows -> output rows: dequantize, cast, quantize as the job says."""
    name = job.entry.name
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    if job.source_q is not None and job.source_q == job.target_q:  # kept as packed; only float parts are cast
        return {n: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a for n, a in arrays.items()}
    if job.source_q is not None:
        q = job.source_q
        w = mx.dequantize(arrays[name], arrays[prefix + ".scales"], arrays.get(prefix + ".biases"),
                          group_size=q.group_size, bits=q.bits, mode=q.mode)
        arrays = {name: w}
    if job.target_q is not None:
        q = job.target_q
        packed = mx.quantize(arrays[name].astype(dtype), group_size=q.group_size, bits=q.bits, mode=q.mode)
        out = {name: packed[0], prefix + ".scales": packed[1]}
        if q.mode == "affine":
            out[prefix + ".biases"] = packed[2]
        return out
    return {n: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a for n, a in arrays.items()}


def _quantization_block(jobs: list[_Job], policy: Optional[QuantPolicy]) -> Optional[dict]:
    specs = {j.entry.module: j.target_q for j in jobs if j.target_q is not None}
    if not specs:
        return None
    default = policy.default if policy is not None else Counter(specs.values()).most_common(1)[0][0]
    block = default.as_dict()
    for path in sorted(specs):
        if specs[path] != default:
            block[path] = specs[path].as_dict()
    return block


def _shards(jobs: list[_Job], max_bytes: int) -> list[_Shard]:
    shards: list[_Shard] = []
    for job in sorted(jobs, key=lambda j: j.entry.name):
        if not shards or (shards[-1].jobs and shards[-1].nbytes + job.nbytes > max_bytes):
            shards.append(_Shard(""))
        shards[-1].jobs.append(job)
    for i, s in enumerate(shards):
        s.name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def _write_shard(shard: _Shard, folder: Path, reader: CheckpointReader, dtype: mx.Dtype, progress) -> tuple[int, str]:
    tmp = folder / (shard.name + ".incomplete")
    writer = ShardWriter(tmp, shard.tensors)
    try:
        for job in shard.jobs:
            rows = job.entry.rows
            step = max(1, BLOCK_BYTES // max(job.float_row_bytes, 1))
            for a in range(0, rows, step):
                b = min(rows, a + step)
                whole = a == 0 and b == rows
                arrays = job.entry.read(reader.get, None if whole else a, None if whole else b)
                # Row-major before the bytes leave MLX: transposes run on MLX's device (the GPU on a Mac).
                out = {n: mx.contiguous(v) for n, v in _transform(job, arrays, dtype).items()}
                mx.eval(out)
                for n, value in out.items():
                    if n not in job.outputs:
                        raise CheckpointError(f"internal: {job.entry.name} produced an unplanned tensor {n}")
                    if not job.outputs[n].shape:
                        value = value.reshape(())
                    progress.update(writer.write_rows(n, a, value))
                del arrays, out
                mx.clear_cache()  # give freed blocks back, so that memory stays at about one block
        digest = writer.digest()
    finally:
        writer.close()
    os.replace(tmp, folder / shard.name)
    return writer.size, digest


def _save_json(path: Path, data, indent: int = 2) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_config(raw: dict, config: ModelConfig, dtype: mx.Dtype, quant: Optional[dict]) -> dict:
    out = copy.deepcopy(raw)
    out.pop("quantization", None)
    out.pop("quantization_config", None)
    out.pop("_name_or_path", None)
    if config.vision is None:
        out.pop("vision_config", None)
    name = next(k for k, v in DTYPES.items() if v == dtype)
    found = False
    for d in (out, out.get("text_config"), out.get("vision_config")):
        if isinstance(d, dict):
            for key in ("torch_dtype", "dtype"):
                if key in d:
                    d[key], found = name, True
    if not found:
        out["torch_dtype"] = name
    if quant:
        out["quantization"] = quant
        out["quantization_config"] = copy.deepcopy(quant)  # mlx-lm writes both
    return out


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    quant_recipe: Optional[str] = None,
    quantize_vision: bool = False,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    dequantize: bool = False,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    verbose: bool = True,
) -> ConvertResult:
    """Convert a Llama 4 checkpoint (local folder or Hub repo id) into an MLX checkpoint folder ``mlx_path``.

    Sources: Hugging Face (bf16), per-expert, FP8 (dequantized on the fly), mlx-lm / mlx-vlm (mlx-community;
    kept as packed unless ``quantize`` or ``dequantize`` says otherwise) and our own output. ``quantize`` with
    ``q_bits`` / ``q_group_size`` / ``q_mode``, or a mixed ``quant_recipe`` (``mixed_<expert bits>_<other bits>``);
    see ``policy.py``. ``dtype`` (float16, bfloat16, float32) is the float dtype written, by default the
    source's. A non-empty ``mlx_path`` is refused unless ``force``. An interrupted run resumes when rerun.
    """
    t0 = time.perf_counter()
    if quantize and dequantize:
        raise ConvertError("choose either quantize or dequantize, not both")
    if quant_recipe is not None:
        quantize = True
    policy = make_policy(q_bits, q_group_size, q_mode, quant_recipe, quantize_vision) if quantize else None
    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine"):
        raise ConvertError("--q-bits / --q-group-size / --q-mode need -q/--quantize")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out_dtype = DTYPES.get(dtype) if dtype else None
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ConvertError("max_shard_size must be positive")
    mlx_path = Path(mlx_path).expanduser().absolute()
    if mlx_path.exists() and not mlx_path.is_dir():
        raise ConvertError(f"{mlx_path} exists and is not a folder")
    if _is_nonempty_dir(mlx_path) and not force:
        raise ConvertError(f"{mlx_path} already exists and is not empty; pass --force to replace it")

    source, is_hub = fetch(str(hf_path), revision, verbose=verbose)
    if source.resolve() == mlx_path.resolve():
        raise ConvertError("the output folder must differ from the input folder")
    raw, config = read_source_config(source)
    try:
        card_metadata = read_card_metadata(source)
    except ValueError as e:
        _log(verbose, f"warning: {e}; the model card keeps no metadata from it")
        card_metadata = {}
    reader = CheckpointReader(source)
    entries = plan_layout(reader.info(), fp8_dtype=mx.float32)
    where = f"{source}" + (f" (files not in its index, not read: {', '.join(reader.unlisted)})" if reader.unlisted else "")
    jobs, config, out_dtype = _plan_jobs(entries, raw, config, policy, dequantize, out_dtype, where)
    if policy is not None and any(j.source_q is not None and j.target_q != j.source_q for j in jobs):
        _log(verbose, "warning: the source is already quantized; its weights are dequantized and quantized again, "
                      "which loses more precision than quantizing the original float weights")
    quant = _quantization_block(jobs, policy)
    shards = _shards(jobs, max_bytes)
    dtype_name = next(k for k, v in DTYPES.items() if v == out_dtype)
    kinds = sorted({e.kind for e in entries} - {"copy"})
    _log(verbose, f"source {source}: {len(reader.files)} shard(s), {reader.total_bytes / 1e9:.2f} GB"
                  + (f", layout {'/'.join(kinds)}" if kinds else ""))
    if policy is not None:
        quant_text = policy.describe()
    elif quant:
        quant_text = "quantization kept from the source"
    else:
        quant_text = "not quantized"
    _log(verbose, f"output {mlx_path}: {dtype_name}, {quant_text}; {len(shards)} shard(s), "
                  f"{sum(s.nbytes for s in shards) / 1e9:.2f} GB")

    fingerprint = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION,
        "source": reader.fingerprint(),
        "dtype": dtype_name,
        "shards": [[s.name, [[n, list(i.shape), str(i.dtype)] for n, i in s.tensors]] for s in shards],
        "quantization": quant,
    }, sort_keys=True).encode()).hexdigest()

    work = mlx_path.with_name(f".{mlx_path.name}.partial")
    state_path = work / STATE_FILE
    state = {"fingerprint": fingerprint, "finished": {}}
    if work.exists():
        try:
            old = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old and old.get("fingerprint") == fingerprint:
            state["finished"] = old.get("finished", {})
        else:
            _log(verbose, f"discarding {work} (left by a conversion with other input or options)")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    total = sum(s.nbytes for s in shards)
    reused, written = 0, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", disable=not verbose) as bar:
        for shard in shards:
            done = state["finished"].get(shard.name)
            f = work / shard.name
            if done and f.is_file() and f.stat().st_size == done["size"] and shard_digest(f) == done["digest"]:
                reused += 1
                bar.update(shard.nbytes)
                continue
            state["finished"].pop(shard.name, None)
            size, digest = _write_shard(shard, work, reader, out_dtype, bar)
            written += size
            state["finished"][shard.name] = {"size": size, "digest": digest}
            _save_json(state_path, state)
    if reused:
        _log(verbose, f"resumed: kept {reused} finished shard(s) from an earlier run")

    # Everything but the weights: small files, written last.
    weight_map = {n: s.name for s in shards for n, _ in s.tensors}
    _save_json(work / "model.safetensors.index.json", {
        "metadata": {"total_size": total, "format": "mlx", "converter": f"mlx-llama4 (format {FORMAT_VERSION})"},
        "weight_map": dict(sorted(weight_map.items())),
    }, indent=4)
    licenses = copy_side_files(source, work)
    if not any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        _log(verbose, "warning: the source has no tokenizer files; copy them into the output before use")
    if not licenses:
        _log(verbose, "warning: the source has no LICENSE file; add the model's license before sharing the output")
    card = model_card(str(hf_path), is_hub, quant_text, dtype_name, config.vision is not None, card_metadata,
                      tuple(licenses), upload_repo)
    (work / "README.md").write_text(card, encoding="utf-8")
    _save_json(work / "config.json", _output_config(raw, config, out_dtype, quant), indent=4)
    state_path.unlink()
    for stray in work.glob("*.incomplete"):
        stray.unlink()
    _fsync_dir(work)

    # Into place: the finished folder appears in one rename.
    old = None
    if mlx_path.exists():
        if _is_nonempty_dir(mlx_path):
            old = mlx_path.with_name(f".{mlx_path.name}.old-{os.getpid()}")
            os.replace(mlx_path, old)
        else:
            mlx_path.rmdir()
    os.replace(work, mlx_path)
    _fsync_dir(mlx_path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    seconds = time.perf_counter() - t0
    _log(verbose, f"done in {seconds:.1f} s: {mlx_path}")

    if upload_repo:
        upload(mlx_path, upload_repo, verbose=verbose)
    return ConvertResult(mlx_path, [s.name for s in shards], reused, written, quant, seconds)
