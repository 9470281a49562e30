"""Hugging Face ``kimi_linear`` folders of our models (names and shapes in hf_names).

- ``export_state_dict(state, config, out)`` / ``export_model(model, out)``: our full (TP=1) weights
  -> ``config.json`` + safetensors with the released checkpoint's names (docs/architecture.md, "Hugging Face names"), sharded with ``model.safetensors.index.json``
  when larger than ``max_shard_size``, plus a tokenizer (``tokenizer_dir``) and its special-token
  ids in ``config.json`` and ``generation_config.json``: the folder alone tokenizes and generates.
- ``HFFolder`` and ``load_hf_weights_into``: an HF folder (the released checkpoint's names (docs/architecture.md, "Hugging Face names") or transformers' runtime
  names, sharded or not) read into our (TP=1) model.

Training checkpoints on either side (``export_checkpoint``, ``import_hf_folder``) are
train/hf_checkpoint.py's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from parallel.buckets import consecutive_groups

from .config import ModelConfig
from .hf_names import (
    HFConversionError,
    HFTensor,
    canonical_hf_names,
    check_exportable,
    group_by_ours,
    hf_config_from_model_config,
    hf_tensor_from_ours,
    hf_tensor_specs,
    ours_from_hf_tensors,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some HF checkpoints carry that hold no weights of the model
IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|\._extra_state)$")


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as in transformers, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * base**power)


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar (tqdm ships with transformers); ``iterable=None`` gives a bar updated by hand."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", disable=not enabled)


# ---------------------------------------------------------------------------- export
# files of a model folder that a tokenizer folder may also hold; never copied over the export's own
_MODEL_FILES = re.compile(r"^(config\.json|generation_config\.json|.*\.safetensors(\.index\.json)?|"
                          r".*\.(bin|pt|pth|ckpt|h5|msgpack|gguf)|pytorch_model.*\.json)$")


def ship_tokenizer(tokenizer_dir: str | Path, out: Path, config: ModelConfig,
                   trust_remote_code: bool = False) -> ModelConfig:
    """Copy the tokenizer's files into the export; return ``config`` with the tokenizer's special
    ids. Its EOS separates documents in our data, so EOS also stands for BOS and PAD where the
    tokenizer defines none (as in GPT-2)."""
    from data.tokenizer import check_vocab_fits, load_tokenizer, tokenizer_vocab_size

    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    check_vocab_fits(tokenizer_vocab_size(tokenizer), config.vocab_size, f"the tokenizer in {tokenizer_dir}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HFConversionError(f"the tokenizer in {tokenizer_dir} defines no eos_token; generation needs one")
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file() and not _MODEL_FILES.match(path.name):
            shutil.copy2(path, out / path.name)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return config.replace(bos_token_id=int(bos), eos_token_id=int(eos), pad_token_id=int(pad))


def _plan_shards(specs: list[HFTensor], dtype: torch.dtype, max_bytes: int) -> list[list[HFTensor]]:
    """Consecutive tensors packed into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    element = torch.empty((), dtype=dtype).element_size()
    return consecutive_groups(specs, [spec.numel * (4 if spec.fp32 else element) for spec in specs], max_bytes)


def export_state_dict(
    state: dict,
    config: ModelConfig,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    model_max_length: int | None = None,
    progress: bool = True,
    allow_group_routing_mismatch: bool = False,
    tokenizer_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``state`` (our full, TP=1 state dict) as an HF folder, with the tokenizer in
    ``tokenizer_dir`` if given (``ship_tokenizer``). Returns the folder."""
    if dtype not in DTYPES:
        raise HFConversionError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    check_exportable(config, allow_group_routing_mismatch)
    specs = hf_tensor_specs(config)
    missing = sorted({s.ours for s in specs if s.ours} - set(state))
    if missing:
        raise HFConversionError(
            f"the model has no tensor(s) {missing[:5]} needed for the export ({len(missing)} missing)"
        )
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        old.unlink(missing_ok=True)  # never leave shards of an earlier export behind
    shards = _plan_shards(specs, torch_dtype, parse_size(max_shard_size))
    names = (
        [SINGLE_FILE] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total_bytes = {}, 0
    bar = _progress(None, len(specs), "export", progress)
    for file, shard in zip(names, shards):
        tensors = {}
        for spec in shard:
            t = hf_tensor_from_ours(spec, state.get(spec.ours))
            t = t.to(torch.float32 if spec.fp32 else torch_dtype, copy=True).contiguous()
            tensors[spec.hf] = t
            weight_map[spec.hf] = file
            total_bytes += t.numel() * t.element_size()
            bar.update(1)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_dir:
        config = ship_tokenizer(tokenizer_dir, out, config, trust_remote_code)
    hf_config = hf_config_from_model_config(config, dtype, model_max_length)
    hf_config["transformers_version"] = _transformers_version()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return "unknown"


def export_model(model, out_dir, **kwargs) -> Path:
    """Export a single-process (TP=1) model object."""
    from . import tp

    if tp.tp_size() != 1:
        raise HFConversionError("export needs the whole model in one process (TP=1); use "
                                "train.hf_checkpoint.export_checkpoint")
    return export_state_dict(model.state_dict(), model.model_config, out_dir, **kwargs)


# ---------------------------------------------------------------------------- import
class HFFolder:
    """Lazy access to the tensors of an HF folder (one file or sharded with an index)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not (self.folder / "config.json").exists():
            raise HFConversionError(f"{self.folder} has no config.json; point --hf at a Hugging Face model folder")
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise HFConversionError(f"{self.folder}/config.json is not valid JSON ({err})") from None
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise HFConversionError(f"{self.folder} has no *.safetensors files (only safetensors are read)")
        self._handles = {}
        self.locations = {}
        for file in files:
            try:
                handle = safe_open(str(self.folder / file), framework="pt")
            except Exception as err:  # noqa: BLE001 - re-raised with the file name
                raise HFConversionError(
                    f"cannot read {self.folder / file} ({type(err).__name__}: {err}); the file is corrupt or truncated"
                ) from None
            self._handles[file] = handle
            for name in handle.keys():
                self.locations[name] = file

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.locations[name]].get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise HFConversionError(f"cannot read tensor {name} from {self.locations.get(name)} ({err})") from None

    def lazy_tensors(self) -> dict:
        return {name: (lambda n=name: self.get(n)) for name in self.locations}


def load_hf_weights_into(model, config: ModelConfig, folder: HFFolder, progress: bool = True) -> None:
    """Fill our (TP=1) model from the HF tensors; every tensor must be present, none left over."""
    tensors = canonical_hf_names(folder.lazy_tensors())
    specs = hf_tensor_specs(config)
    groups = group_by_ours(specs)
    state = model.state_dict()
    missing = [s.hf for s in specs if s.ours and s.hf not in tensors]
    if missing:
        raise HFConversionError(
            f"{folder.folder} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}"
        )
    expected = {s.hf for s in specs}
    unexpected = sorted(n for n in tensors if n not in expected and not IGNORED_HF.search(n))
    if unexpected:
        raise HFConversionError(
            f"{folder.folder} has {len(unexpected)} tensor(s) that the config does not explain, e.g. {unexpected[:5]}"
        )
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for ours, group in _progress(groups.items(), len(groups), "import", progress):
            if ours not in state:
                raise HFConversionError(f"our model has no tensor {ours}")
            target = params.get(ours, buffers.get(ours))
            values = [_tensor(tensors[s.hf]) for s in group]
            full = ours_from_hf_tensors(group, values, target.shape)
            target.copy_(full.to(target.dtype))


def _tensor(value) -> torch.Tensor:
    return value() if callable(value) else value
