"""A checkpoint folder, read without trusting it: where it is (a local folder or a Hub id), its JSON
files, its safetensors headers checked against the file, and its weights (lazily)."""

import json
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import UserError, show


# What a model needs from a Hub repo: configs, weights, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_id: str) -> Path:
    """A local folder as it is, or a Hub id downloaded (or found in the cache) through huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; give the model's folder (the one with config.json)")
        return path
    if not _REPO_ID.match(str(path_or_id)):
        raise UserError(f"{path_or_id} does not exist; give a model folder or a Hub id like Qwen/Qwen3-0.6B")
    return _download(str(path_or_id))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id):
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))


@contextmanager
def hub_errors(repo_id: str):
    """A failed Hub call as one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:
        how = "downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(
            f"{repo_id} is not a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and {how}: download it once while online, or give a local folder"
        ) from None
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} is not a model on the Hugging Face Hub (or it is private); check the id") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download {repo_id}: {str(e).splitlines()[0]}") from None


MAX_JSON = 100_000_000  # bytes; a real config or index is a few kB, at most a few MB


def read_json(file: Path) -> dict:
    """A JSON file holding an object, or one line saying why it cannot be read (never a traceback)."""
    try:
        if not file.is_file():  # a FIFO or a device: reading it could block or never end
            raise UserError(f"{file} is not a regular file")
        if file.stat().st_size > MAX_JSON:
            raise UserError(f"{file} is {file.stat().st_size:,} bytes, too large to be a real {file.name}")
        data = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; download it again") from None
    except OSError as e:
        raise UserError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        value = json.loads(data)
    except RecursionError:
        raise UserError(f"{file} is nested too deeply to be a real {file.name}; download it again") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise UserError(f"{file} is not valid JSON ({str(e).splitlines()[0]}); download it again") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} must hold a JSON object, not {json_kind(value)}; download it again")
    return value


def json_kind(value) -> str:
    """What a JSON value is, for a message: null, a list, a string, ..."""
    return {type(None): "null", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", dict: "an object"}.get(type(value), type(value).__name__)


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder} has no config.json; is it a Hugging Face or MLX model folder?")
    return read_json(file)


# safetensors dtype -> bytes per element, for the dtypes MLX loads (F8_E4M3 arrives as uint8).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "C64": 8,
}
MAX_HEADER = 100_000_000  # the safetensors format's own limit


def safetensors_header(file: Path) -> dict:
    """Read and check a safetensors header: each tensor's dtype, shape and byte range agree, and lie
    inside the file. A truncated or corrupt file is refused before any load."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if n is None or n > size - 8 or n > MAX_HEADER:
                raise UserError(f"{file} is truncated or not a safetensors file; download or convert it again")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested absurdly deep
        raise UserError(f"{file} has a corrupt header; download or convert it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{file} has a corrupt header (not a JSON object); download or convert it again")
    meta = header.get("__metadata__")  # MLX writes null
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UserError(f"{file} has a corrupt header (__metadata__ must map names to strings); convert it again")
    end = 0
    for name, t in header.items():
        if name != "__metadata__":
            end = max(end, _check_entry(file, name, t))
    if 8 + n + end > size:
        raise UserError(
            f"{file} is truncated ({size} bytes, its header needs {8 + n + end}); download or convert it again"
        )
    return header


def _check_entry(file: Path, name: str, t) -> int:
    """One tensor's header entry checked; returns where its data ends."""
    bad = f"{file} has a corrupt header: tensor {name!r}"
    if not isinstance(t, dict):
        raise UserError(f"{bad} is not described by an object; download or convert it again")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype == "F64":
        raise UserError(f"tensor {name!r} in {file} is float64, which MLX does not load; "
                        "save the weights as float32, float16 or bfloat16")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise UserError(f"{bad} has dtype {show(dtype)}, which MLX does not load "
                        f"(known: {', '.join(DTYPE_SIZES)}); convert it again")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
        raise UserError(f"{bad} has shape {show(shape)}, not a list of sizes; download or convert it again")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise UserError(f"{bad} has data_offsets {show(offsets)}; download or convert it again")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise UserError(
            f"{bad} is {dtype} of shape {tuple(shape)} ({count * DTYPE_SIZES[dtype]} bytes) but spans "
            f"{offsets[1] - offsets[0]} bytes; download or convert it again"
        )
    return offsets[1]


def stored_bytes(folder: Path) -> int:
    """The bytes of every tensor in the folder's weights, from their headers alone."""
    total = 0
    for file in weight_files(folder):
        header = safetensors_header(file)
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total


def describe(path_or_id: str):
    """(config, weight bytes) of a model folder, or of a Hub model without downloading its weights (its
    config.json, and its safetensors headers read from the Hub)."""
    path = Path(path_or_id).expanduser()
    if path.exists() or not _REPO_ID.match(str(path_or_id)):
        folder = resolve(path_or_id)
        return read_config(folder), stored_bytes(folder)
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    with hub_errors(str(path_or_id)):
        config = read_json(Path(hf_hub_download(str(path_or_id), "config.json")))
        try:
            meta = get_safetensors_metadata(str(path_or_id))
        except (NotASafetensorsRepoError, SafetensorsParsingError) as e:
            raise UserError(f"{path_or_id} has no readable safetensors weights ({str(e).splitlines()[0]})") from None
    weights = sum(t.data_offsets[1] - t.data_offsets[0] for f in meta.files_metadata.values()
                  for t in f.tensors.values())
    return config, weights


def weight_files(folder: Path) -> list:
    """The shards named by model.safetensors.index.json, or every *.safetensors in the folder.

    An index cannot name a file outside the folder (/etc/x, ../x); symlinks the folder holds are followed.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map object (it has {json_kind(weight_map)}); download it again")
        names = set()
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise UserError(f"{index} maps {show(key)} to {show(name)}, not a file name; download it again")
            names.add(name)
        files = [_inside(folder, name, index) for name in sorted(names)]
        missing = [n for n, f in zip(sorted(names), files) if not f.is_file()]
        if missing:
            raise UserError(f"{folder} lacks shards named in its index: {', '.join(missing[:3])}; download them again")
        return files
    files = [_inside(folder, f.name, None) for f in sorted(folder.glob("*.safetensors"))]
    odd = [f.name for f in files if not f.is_file()]  # a FIFO would block the first read forever
    if odd:
        raise UserError(f"{folder / odd[0]} is not a regular file; download or convert the weights again")
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights (.bin and .gguf files are not supported)")
    return files


def _inside(folder: Path, name: str, index: Optional[Path]) -> Path:
    """folder/name, refused where the name leads out of the folder. A symlink the folder holds is
    followed: weights linked onto another disk, or into a Hugging Face cache, are the user's choice."""
    named = f"{index} names {show(name)}" if index else f"{folder / name}"
    if "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{named}, a path outside the model folder; refusing to read it")
    path = folder / name
    try:
        path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"{named}, which cannot be resolved (a symlink loop?)") from None
    return path


def read_weights(folder: Path) -> dict:
    """All tensors of the folder, lazily: MLX reads each from its file when first evaluated."""
    weights = {}
    for file in weight_files(folder):
        safetensors_header(file)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{file} cannot be loaded ({str(e).splitlines()[0]}); convert it again") from None
    return weights
