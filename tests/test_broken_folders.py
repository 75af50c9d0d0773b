"""Broken model folders, generated: each is refused with one line, never a traceback, a hang or a read
past the embedding.

Every case starts from a folder that loads and generates (a tiny checkpoint with a tiny byte-level
tokenizer; `test_the_intact_folders_load_and_generate` holds that), breaks one thing, and is run
- through load(): a UserError whose message is one line (or, for a template that fails only when
  rendered, through the first apply_chat_template);
  on the way it builds no model larger than the intact one (a config claiming a million layers once
  hung in building it);
- through `python -m mlx_qwen3.generate --model DIR --prompt hi --max-tokens 2`: exit 2, stderr exactly
  "error: " and load()'s own message, no traceback, no hang. These run from one warm interpreter
  (tests/warm_cli.py); a few run as fresh processes too, and must read the same.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from checkpoints import copy_tokenizer
from warm_cli import run_many

from mlx_qwen3 import UserError, load
from mlx_qwen3.checkpoint import read_config
from mlx_qwen3.load import model_args
from mlx_qwen3.models import MODELS

REPO = Path(__file__).resolve().parents[1]
CLI_WORKERS = 4  # subprocesses at a time

# ---- the intact bases -------------------------------------------------------------------------------

TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def write_tiny_tokenizer(folder: Path):
    """A byte-level BPE over printable ASCII and newline plus Qwen's special tokens: about 100 ids,
    so it fits the tiny checkpoints' 256-row embedding (the real Qwen3 tokenizer does not)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from mlx_qwen3.tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    chars = [b2u[b] for b in [10, *range(32, 127)]]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    write_json(folder / "tokenizer_config.json", {"chat_template": TEMPLATE, "eos_token": "<|im_end|>"})
    write_json(folder / "generation_config.json", {"eos_token_id": [im_end], "temperature": 0.6, "top_p": 0.95,
                                                   "top_k": 20})


def make_bases(root: Path, checkpoint) -> dict:
    """name -> an intact folder: "tiny" (Qwen3, one file), "moe" (Qwen3-MoE, sharded with an index),
    "quant" (tiny, 4-bit MLX). `checkpoint(name)` gives a folder written by tests/checkpoints.py."""
    from mlx_qwen3.convert import convert

    bases = {}
    for name, source in (("tiny", "qwen3"), ("moe", "qwen3_moe")):
        bases[name] = root / name
        shutil.copytree(checkpoint(source), bases[name])
        write_tiny_tokenizer(bases[name])
    bases["quant"] = convert(bases["tiny"], root / "quant", quantize=True, bits=4, group_size=32)
    return bases


# ---- ways to break a folder -------------------------------------------------------------------------

def write_json(file: Path, value):
    file.write_text(json.dumps(value))


def edit_json(name: str, **changes):
    """A breaker setting keys of a JSON file (None deletes the key)."""
    def breaks(folder):
        data = json.loads((folder / name).read_text())
        for k, v in changes.items():
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        write_json(folder / name, data)
    return breaks


def config(**changes):
    return edit_json("config.json", **changes)


def raw(name: str, content):
    """A breaker replacing a file's bytes (or text)."""
    def breaks(folder):
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return breaks


def to_moe(**changes):
    """The tiny dense checkpoint relabelled Qwen3-MoE (a bad MoE config is refused before any weight)."""
    moe = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return config(**{**moe, **changes})


def read_safetensors(file: Path):
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(file: Path, header, body: bytes):
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    text = text.encode() if isinstance(text, str) else text
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)


NORM = "model.norm.weight"  # F32, shape [64]: 256 bytes


def header(change, file="model.safetensors"):
    """A breaker editing the raw safetensors header (data unchanged): change(header) -> header."""
    def breaks(folder):
        h, body = read_safetensors(folder / file)
        write_safetensors(folder / file, change(h), body)
    return breaks


def entry(**changes):
    def change(h):
        h[NORM].update(changes)
        return h
    return header(change)


def tensors(change, file="model.safetensors"):
    """A breaker rewriting tensors through safetensors: change(dict of numpy arrays)."""
    def breaks(folder):
        from safetensors.numpy import load_file, save_file

        weights = load_file(folder / file)
        change(weights)
        save_file(weights, folder / file, metadata={"format": "pt"})
    return breaks


def retype(name, dtype):
    return tensors(lambda w: w.update({name: w[name].astype(dtype)}))


def index(change):
    def breaks(folder):
        f = folder / "model.safetensors.index.json"
        value = change(json.loads(f.read_text()))
        f.write_text(value if isinstance(value, str) else json.dumps(value))
    return breaks


def first_shard(folder) -> str:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))[0]


def shard_outside(kind):
    """The index names a real shard outside the folder: by a ../ path or an absolute one."""
    def breaks(folder):
        shard = first_shard(folder)
        outside = folder.parent / f"outside-{shard}"
        shutil.copy(folder / shard, outside)
        name = f"../{outside.name}" if kind == "dotdot" else str(outside)
        (folder / shard).unlink()
        f = folder / "model.safetensors.index.json"
        idx = json.loads(f.read_text())
        idx["weight_map"] = {k: (name if v == shard else v) for k, v in idx["weight_map"].items()}
        write_json(f, idx)
    return breaks


def weights_a_fifo(folder):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")  # opening it for reading would wait for a writer forever


def drop_expert(folder):
    for f in folder.glob("model-*.safetensors"):
        tensors(lambda w: w.pop("model.layers.0.mlp.experts.3.up_proj.weight", None), f.name)(folder)


def misshape_expert(folder):
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    for f in folder.glob("model-*.safetensors"):
        tensors(lambda w: name in w and w.update({name: np.ascontiguousarray(w[name][:, :-8])}), f.name)(folder)


def real_tokenizer(folder):
    copy_tokenizer(folder)  # ids up to 151,668 against an embedding of 256 rows


QUANT_LAYER = "model.layers.0.mlp.up_proj"


# name -> (base, breaker, when it is refused: "load", or "render" for a template that fails only when used)
CASES = {
    # config.json: not an object, not JSON, not UTF-8
    "config null": ("tiny", raw("config.json", "null"), "load"),
    "config a list": ("tiny", raw("config.json", "[1, 2]"), "load"),
    "config a string": ("tiny", raw("config.json", '"qwen3"'), "load"),
    "config not UTF-8": ("tiny", raw("config.json", b'{"model_type": "qwen3\xff\xfe"}'), "load"),
    "config nested 100000 deep": ("tiny", raw("config.json", "[" * 100_000 + "]" * 100_000), "load"),
    "config integer of 5000 digits": ("tiny", raw("config.json", '{"model_type": "qwen3", "hidden_size": '
                                              + "9" * 5000 + "}"), "load"),
    # config.json: wrong types
    "model_type a list": ("tiny", config(model_type=["qwen3"]), "load"),
    "model_type missing": ("tiny", config(model_type=None), "load"),
    "hidden_size a string": ("tiny", config(hidden_size="64"), "load"),
    "hidden_size a float": ("tiny", config(hidden_size=64.5), "load"),
    "hidden_size a boolean": ("tiny", config(hidden_size=True), "load"),
    "num_hidden_layers a list": ("tiny", config(num_hidden_layers=[2]), "load"),
    "rope_theta a string": ("tiny", config(rope_theta="x"), "load"),
    "rms_norm_eps a string": ("tiny", config(rms_norm_eps="1e-6"), "load"),
    "tie_word_embeddings the string false": ("tiny", config(tie_word_embeddings="false"), "load"),
    "attention_bias the string true": ("tiny", config(attention_bias="true"), "load"),
    "use_sliding_window the number 0": ("tiny", config(use_sliding_window=0), "load"),
    "head_dim a float": ("tiny", config(head_dim=32.5), "load"),
    # config.json: zero, negative, non-finite, absurd
    "hidden_size 0": ("tiny", config(hidden_size=0), "load"),
    "hidden_size negative": ("tiny", config(hidden_size=-64), "load"),
    "num_attention_heads 0": ("tiny", config(num_attention_heads=0), "load"),
    "num_key_value_heads 0": ("tiny", config(num_key_value_heads=0), "load"),
    "intermediate_size negative": ("tiny", config(intermediate_size=-1), "load"),
    "vocab_size 10**12": ("tiny", config(vocab_size=10**12), "load"),
    "max_position_embeddings 0": ("tiny", config(max_position_embeddings=0), "load"),
    "rope_theta negative": ("tiny", config(rope_theta=-1.0), "load"),
    "rope_theta NaN": ("tiny", config(rope_theta=math.nan), "load"),
    "rope_theta Infinity": ("tiny", config(rope_theta=math.inf), "load"),
    "rms_norm_eps 0": ("tiny", config(rms_norm_eps=0), "load"),
    # config.json: fields that disagree
    "heads do not divide hidden_size": ("tiny", config(head_dim=None, num_attention_heads=3,
                                                       num_key_value_heads=1), "load"),
    "num_key_value_heads does not divide the heads": ("tiny", config(num_key_value_heads=3), "load"),
    "odd head_dim": ("tiny", config(head_dim=33), "load"),
    "num_experts_per_tok over num_experts": ("tiny", to_moe(num_experts_per_tok=5), "load"),
    "num_experts a string": ("tiny", to_moe(num_experts="4"), "load"),
    "decoder_sparse_step 0": ("tiny", to_moe(decoder_sparse_step=0), "load"),
    "mlp_only_layers a string": ("tiny", to_moe(mlp_only_layers="1"), "load"),
    "mlp_only_layers negative": ("tiny", to_moe(mlp_only_layers=[-1]), "load"),
    # config.json: weights that could not exist (these hung before)
    "num_hidden_layers 1000000": ("tiny", config(num_hidden_layers=1_000_000), "load"),
    "hidden_size 2**20": ("tiny", config(hidden_size=2**20), "load"),
    "intermediate_size 10**9": ("tiny", config(intermediate_size=10**9), "load"),
    "moe with 10**6 experts": ("tiny", to_moe(num_experts=10**6), "load"),
    # rope_scaling / rope_parameters
    "rope_scaling a list": ("tiny", config(rope_scaling=["yarn"]), "load"),
    "rope_scaling a string": ("tiny", config(rope_scaling="yarn"), "load"),
    "rope_scaling type a number": ("tiny", config(rope_scaling={"type": 5, "factor": 4.0}), "load"),
    "yarn without factor": ("tiny", config(rope_scaling={"type": "yarn"}), "load"),
    "yarn factor a string": ("tiny", config(rope_scaling={"type": "yarn", "factor": "4"}), "load"),
    "yarn factor negative": ("tiny", config(rope_scaling={"type": "yarn", "factor": -4.0}), "load"),
    "yarn original_max_position_embeddings 0": (
        "tiny", config(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}), "load"),
    "yarn mscale_all_dim negative": (
        "tiny", config(rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 1, "mscale_all_dim": -10}), "load"),
    "rope_parameters a list": ("tiny", config(rope_parameters=[1]), "load"),
    "rope_parameters rope_theta a string": ("tiny", config(rope_theta=None, rope_parameters={"rope_theta": "x"}),
                                            "load"),
    # quantization / quantization_config
    "quantization a list": ("quant", config(quantization=[4, 32]), "load"),
    "quantization bits a string": ("quant", config(quantization={"group_size": 32, "bits": "4"}), "load"),
    "quantization bits 7": ("quant", config(quantization={"group_size": 32, "bits": 7}), "load"),
    "quantization group_size 0": ("quant", config(quantization={"group_size": 0, "bits": 4}), "load"),
    "quantization without bits": ("quant", config(quantization={"group_size": 32}), "load"),
    "quantization mode unknown": ("quant", config(quantization={"group_size": 32, "bits": 4, "mode": "int3"}), "load"),
    "quantization per-layer a string": ("quant", config(quantization={"group_size": 32, "bits": 4,
                                                                      QUANT_LAYER: "x"}), "load"),
    "quantization per-layer bits 9": (
        "quant", config(quantization={"group_size": 32, "bits": 4, QUANT_LAYER: {"group_size": 32, "bits": 9}}),
        "load"),
    "quantization per-layer unknown key": (
        "quant", config(quantization={"group_size": 32, "bits": 4,
                                      QUANT_LAYER: {"group_size": 32, "bits": 4, "global_scale": True}}), "load"),
    "quantization_config a list": ("tiny", config(quantization_config=["fp8"]), "load"),
    "quantization_config quant_method a number": ("tiny", config(quantization_config={"quant_method": 8}), "load"),
    "packed weights stored as float": ("quant", retype(f"{QUANT_LAYER}.weight", np.float32), "load"),
    "packed weights stored as int32": ("quant", retype(f"{QUANT_LAYER}.weight", np.int32), "load"),
    "scales fitting no group size": (
        "quant", tensors(lambda w: w.update({f"{QUANT_LAYER}.scales": np.ones((96, 3), np.float32),
                                             f"{QUANT_LAYER}.biases": np.ones((96, 3), np.float32)})), "load"),
    # model.safetensors.index.json
    "index not JSON": ("moe", raw("model.safetensors.index.json", "{weight_map"), "load"),
    "index not UTF-8": ("moe", raw("model.safetensors.index.json", b'{"weight_map": {"\xff": 1}}'), "load"),
    "index a list": ("moe", raw("model.safetensors.index.json", "[]"), "load"),
    "index without weight_map": ("moe", index(lambda i: {"metadata": i.get("metadata")}), "load"),
    "weight_map a list": ("moe", index(lambda i: {"weight_map": sorted(set(i["weight_map"].values()))}), "load"),
    "weight_map value a number": ("moe", index(lambda i: {"weight_map": {**i["weight_map"], "x": 1}}), "load"),
    "weight_map value empty": ("moe", index(lambda i: {"weight_map": {**i["weight_map"], "x": ""}}), "load"),
    "weight_map naming ../": ("moe", shard_outside("dotdot"), "load"),
    "weight_map naming an absolute path": ("moe", shard_outside("absolute"), "load"),
    "weights a FIFO": ("tiny", weights_a_fifo, "load"),
    "an expert missing": ("moe", drop_expert, "load"),
    "an expert of another shape": ("moe", misshape_expert, "load"),
    # safetensors headers
    "header shape disagrees with the bytes": ("tiny", entry(shape=[65]), "load"),
    "header dtype disagrees with the bytes": ("tiny", entry(dtype="F16"), "load"),
    "header dtype unknown": ("tiny", entry(dtype="Q4"), "load"),
    "header dtype a number": ("tiny", entry(dtype=4), "load"),
    "header offsets reversed": ("tiny", lambda f: entry(data_offsets=_reversed(f))(f), "load"),
    "header shape negative": ("tiny", entry(shape=[-64]), "load"),
    "header shape a string": ("tiny", entry(shape="64"), "load"),
    "header entry a number": ("tiny", header(lambda h: {**h, NORM: 5}), "load"),
    "header a list": ("tiny", header(lambda h: "[]"), "load"),
    "header nested 100000 deep": ("tiny", header(lambda h: "[" * 100_000 + "]" * 100_000), "load"),
    "header __metadata__ a list": ("tiny", header(lambda h: {**h, "__metadata__": ["pt"]}), "load"),
    "header length 2**62": ("tiny", lambda f: (f / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**62) + (f / "model.safetensors").read_bytes()[8:]), "load"),
    # dtypes where float weights belong
    "float64 weights": ("tiny", retype(NORM, np.float64), "load"),
    "int32 weights": ("tiny", retype(NORM, np.int32), "load"),
    "int64 embedding": ("tiny", retype("model.embed_tokens.weight", np.int64), "load"),
    "bool weights": ("tiny", retype(NORM, np.bool_), "load"),
    "uint8 weights": ("tiny", retype("lm_head.weight", np.uint8), "load"),
    # generation_config.json
    "generation_config null": ("tiny", raw("generation_config.json", "null"), "load"),
    "generation_config a list": ("tiny", raw("generation_config.json", "[0.6]"), "load"),
    "generation_config not UTF-8": ("tiny", raw("generation_config.json", b'{"temperature": "\xff"}'), "load"),
    "eos_token_id a string": ("tiny", edit_json("generation_config.json", eos_token_id="<|im_end|>"), "load"),
    "eos_token_id list with a string": ("tiny", edit_json("generation_config.json", eos_token_id=[1, "x"]), "load"),
    "eos_token_id negative": ("tiny", edit_json("generation_config.json", eos_token_id=-1), "load"),
    "temperature negative": ("tiny", edit_json("generation_config.json", temperature=-1), "load"),
    "temperature NaN": ("tiny", edit_json("generation_config.json", temperature=math.nan), "load"),
    "temperature a string": ("tiny", edit_json("generation_config.json", temperature="0.6"), "load"),
    "top_p 0": ("tiny", edit_json("generation_config.json", top_p=0), "load"),
    "top_p 2": ("tiny", edit_json("generation_config.json", top_p=2), "load"),
    "top_k negative": ("tiny", edit_json("generation_config.json", top_k=-1), "load"),
    "top_k a float": ("tiny", edit_json("generation_config.json", top_k=2.5), "load"),
    "min_p 5": ("tiny", edit_json("generation_config.json", min_p=5), "load"),
    # tokenizer_config.json, chat templates, tokenizer
    "tokenizer_config null": ("tiny", raw("tokenizer_config.json", "null"), "load"),
    "tokenizer_config not UTF-8": ("tiny", raw("tokenizer_config.json", b'{"eos_token": "\xff"}'), "load"),
    "eos_token a number": ("tiny", edit_json("tokenizer_config.json", eos_token=5), "load"),
    "bos_token a list": ("tiny", edit_json("tokenizer_config.json", bos_token=["<s>"]), "load"),
    "chat_template a number": ("tiny", edit_json("tokenizer_config.json", chat_template=5), "load"),
    "chat_template an object": ("tiny", edit_json("tokenizer_config.json", chat_template={"default": 5}), "load"),
    "chat_template list of strings": ("tiny", edit_json("tokenizer_config.json", chat_template=[TEMPLATE]), "load"),
    "chat_template list entry without template": (
        "tiny", edit_json("tokenizer_config.json", chat_template=[{"name": "default"}]), "load"),
    "chat_template list without default": (
        "tiny", edit_json("tokenizer_config.json", chat_template=[{"name": "rag", "template": TEMPLATE}]), "load"),
    "chat_template syntax error": ("tiny", edit_json("tokenizer_config.json", chat_template="{% if %}"), "load"),
    "chat_template.jinja syntax error": ("tiny", raw("chat_template.jinja", "{{ messages[0 }}"), "load"),
    "chat_template.jinja not UTF-8": ("tiny", raw("chat_template.jinja", b"{{ '\xff' }}"), "load"),
    "chat_template empty": ("tiny", edit_json("tokenizer_config.json", chat_template=""), "render"),
    "template rendering nothing": (
        "tiny", edit_json("tokenizer_config.json", chat_template="{% if messages is string %}x{% endif %}"), "render"),
    "template raising TypeError": ("tiny", edit_json("tokenizer_config.json", chat_template="{{ messages + 1 }}"),
                                   "render"),
    "template dividing by zero": ("tiny", edit_json("tokenizer_config.json",
                                                    chat_template="{{ 1 // (messages | length - 1) }}"), "render"),
    "tokenizer.json not UTF-8": ("tiny", raw("tokenizer.json", b"\xff\xfe\x00"), "load"),
    "tokenizer ids past the embedding": ("tiny", real_tokenizer, "load"),
}


def _reversed(folder):
    h, _ = read_safetensors(folder / "model.safetensors")
    start, end = h[NORM]["data_offsets"]
    return [end, start]


def make_case(name: str, folder: Path, bases: dict) -> Path:
    base, breaks, _ = CASES[name]
    shutil.copytree(bases[base], folder, symlinks=True)
    breaks(folder)
    return folder


# ---- the tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(checkpoint, tmp_path_factory):
    return make_bases(tmp_path_factory.mktemp("bases"), lambda name: checkpoint(name)[0])


@pytest.fixture(scope="module")
def folders(bases, tmp_path_factory):
    """name -> its broken folder, made once: load() and the CLIs only read it."""
    root = tmp_path_factory.mktemp("cases")
    return {name: make_case(name, root / f"case{i}" / "model", bases) for i, name in enumerate(CASES)}


GENERATE = ["mlx_qwen3.generate", "--prompt", "hi", "--max-tokens", "2", "--model"]
LOAD = ["mlx_qwen3.load"]


def cli(folder: Path, pythonpath: Path = REPO, timeout: float = 60, command=GENERATE):
    """`python -m COMMAND FOLDER` in a fresh process -> (exit status, stderr); exit None if it was killed
    after `timeout` s (a hang)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    try:
        out = subprocess.run([sys.executable, "-m", *command, str(folder)], capture_output=True, text=True,
                             env=env, cwd=pythonpath, timeout=timeout, stdin=subprocess.DEVNULL)
        return out.returncode, out.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err


def run_all(names, folder_of, pythonpath: Path = REPO, timeout: float = 60, workers: int = CLI_WORKERS,
            command=GENERATE) -> dict:
    with ThreadPoolExecutor(workers) as pool:
        runs = pool.map(lambda n: cli(folder_of(n), pythonpath, timeout, command), names)
        return dict(zip(names, runs))


def refusal(folder: Path, when: str) -> str:
    """load()'s message for a broken folder ("render": that of the first apply_chat_template)."""
    with pytest.raises(UserError) as err:
        if when == "render":  # the template loads; the conversation it fails on is refused
            _, tok = load(folder)
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
        else:
            load(folder)
    REFUSALS[folder] = str(err.value)
    return REFUSALS[folder]


REFUSALS = {}  # folder -> load()'s message, kept for the CLI tests (the real tokenizer takes seconds to load)


def assert_refused_as_load_refuses(result, folder: Path, when: str, name=""):
    """Exit 2 and one stderr line, "error: " and load()'s message: the CLI refused where load() does,
    before it did any more work, and went no further."""
    code, err = result
    assert code == 2 and "Traceback" not in err, f"{name}: exit {code}:\n{err[-2000:]}"
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), f"{name}: {err}"
    message = REFUSALS.get(folder) or refusal(folder, when)
    assert err == f"error: {message}\n", f"{name}: {err}"


@pytest.fixture(scope="module")
def cli_results(folders, tmp_path_factory):
    """Every case through the generate CLI, from one warm interpreter: name -> (exit status, stderr)."""
    return warm(CASES, folders, GENERATE, tmp_path_factory.mktemp("cli"))


def warm(names, folders, command, root: Path) -> dict:
    """`python -m COMMAND FOLDER` for each case, from one warm interpreter -> name -> (exit status, stderr)."""
    runs = run_many([(command[0], [*command[1:], str(folders[n])], None) for n in names], root, REPO)
    return {n: (run.returncode, run.stderr.decode(errors="replace")) for n, run in zip(names, runs)}


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("base", ["tiny", "moe", "quant"])
def test_the_intact_folders_load_and_generate(bases, base):
    """Each case breaks one thing in a folder that works: its refusal is that thing's."""
    model, tok = load(bases[base])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    for command in (GENERATE, LOAD):
        code, err = cli(bases[base], command=command)
        assert code == 0, err


@pytest.fixture
def models_built(monkeypatch):
    """The parameter counts of the models load() builds, as it builds them."""
    built = []
    for module in set(MODELS.values()):
        def spy(args, make=module.Model):
            built.append(args.parameter_count())
            return make(args)
        monkeypatch.setattr(module, "Model", spy)
    return built


@pytest.mark.parametrize("name", CASES)
def test_load_refuses_with_one_line(folders, bases, models_built, name):
    base, _, when = CASES[name]
    message = refusal(folders[name], when)
    assert "\n" not in message and message.strip()
    # refused before building anything larger than the folder it broke (what took minutes, or forever)
    intact = model_args(read_config(bases[base]))[1].parameter_count()
    assert max(models_built, default=0) <= intact, (models_built, intact)


@pytest.mark.parametrize("name", CASES)
def test_generate_cli_exits_2_with_one_line(cli_results, folders, name):
    assert_refused_as_load_refuses(cli_results[name], folders[name], CASES[name][2], name)


# One case of each kind the model alone can have (the load CLI reads no tokenizer).
LOAD_CLI_CASES = ["config null", "tie_word_embeddings the string false", "num_hidden_layers 1000000",
                  "rope_scaling a list", "quantization per-layer bits 9", "weight_map naming ../",
                  "weights a FIFO", "an expert missing", "header dtype unknown", "float64 weights"]


@pytest.fixture(scope="module")
def load_cli_results(folders, tmp_path_factory):
    return warm(LOAD_CLI_CASES, folders, LOAD, tmp_path_factory.mktemp("load-cli"))


def test_the_load_cli_too(load_cli_results, folders):
    for name, result in load_cli_results.items():
        assert_refused_as_load_refuses(result, folders[name], "load", name)


def test_the_warm_runs_read_as_fresh_processes(cli_results, load_cli_results, folders):
    """What tests/warm_cli.py gives is what `python -m` in a new process gives: a config, a weights file
    and a template refused by the generate CLI, a config by the load CLI."""
    fresh = ["config null", "header dtype unknown", "template raising TypeError"]
    assert run_all(fresh, folders.get) == {name: cli_results[name] for name in fresh}
    name = "num_hidden_layers 1000000"
    assert cli(folders[name], command=LOAD) == load_cli_results[name]
