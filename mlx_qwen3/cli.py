"""Every command's click code. `mlx-qwen3 COMMAND` and `python -m mlx_qwen3 COMMAND` run the group;
`python -m mlx_qwen3.generate` (.server, .convert, .load, .selftest, .menubar) runs one command alone.

A thin shell: each command parses, calls the Python API and prints. Through errors.run_cli, bad input is
one line and exit status 2, a stdout whose reader went away ends quietly with 141, a full one is one line
and exit status 1, and Ctrl-C is exit status 130: never a traceback.
"""

import json
import os
import re
import signal
import sys
import threading
from typing import Optional

import click

from . import distributed
from .convert import Interrupted, convert
from .errors import UserError, run_cli
from .generate import ChatSession, GenerationOptions, check_text, prepare, stream_generate, to_messages
from .load import load, load_draft, load_model
from .memory import weight_bytes
from .menubar import AssistantController, MenubarApp
from .models.cache import PromptCache
from .options import MAX_DRAFT, CacheOptions, Drafting
from .models.rope import MODES
from .prompt_file import check_file, load_prompt_cache, save_prompt_cache
from .selftest import DEFAULT_SHAPES, environment, model_report, op_report, stored_choices
from .server import create_app
from .server.engine import CACHE_SLOTS, PARALLEL
from .server.serve import API_KEY_ENV, api_key_from, make_server
from .terminal import Printer, convert_progress, note, prepare_stdout, read_stdin, repl, show_stream

# --model when none is given: Qwen's own MLX release of Qwen3-1.7B, 4-bit (about 1 GB; it thinks well
# enough to show what the models do), so `python -m mlx_qwen3.generate --prompt hi` is a whole first run.
DEFAULT_MODEL = "Qwen/Qwen3-1.7B-MLX-4bit"
CONTEXT = {"help_option_names": ["-h", "--help"]}


def model_option(f):
    return click.option("--model", default=DEFAULT_MODEL, show_default=True,
                        help="Model folder or Hugging Face Hub id.")(f)


# --kv-bits auto|16|8|4: a number goes on as an int
KV_BITS = dict(type=click.Choice(["auto", "16", "8", "4"]), default="auto", show_default=True,
               callback=lambda ctx, param, value: value if value == "auto" else int(value))


def pipeline_option(f):
    return click.option("--pipeline", is_flag=True,
                        help="Launched on several Macs: give each a range of layers (for slow links) instead of "
                             "a share of every layer (tensor parallel, the default).")(f)


def drafting_options(f):
    f = click.option("--num-draft", default="auto", show_default=True, metavar="N|auto",
                     help=f"Drafts checked per pass (1 to {MAX_DRAFT}); auto adapts to how many are accepted.")(f)
    f = click.option("--prompt-lookup", is_flag=True,
                     help="Draft the continuation of n-grams already in the prompt or the reply (no second model: "
                          "pays on edits, quotes, RAG). With --draft-model, tried first.")(f)
    return click.option("--draft-model", default=None, metavar="M",
                        help="Speculative decoding with M, a smaller model of the same vocabulary (Qwen3-0.6B for "
                             "any Qwen3): it drafts, the model checks several tokens per pass. Greedy output is "
                             "unchanged; sampled output keeps its distribution.")(f)


def parse_num_draft(value: str):
    """--num-draft's value as Drafting takes it (an integer, or "auto"); Drafting checks its range."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f'--num-draft must be "auto" or an integer from 1 to {MAX_DRAFT}, not {value!r}') from None


def rope_option(f):
    return click.option("--rope", type=click.Choice(MODES), default="auto", show_default=True,
                        help="auto: plain RoPE while the context fits the model's original window (32,768 for "
                             "Qwen3), else YaRN at the smallest factor that covers it (up to 131,072 tokens); "
                             "config: as config.json says, at every length; plain: never YaRN.")(f)


class _Commands(click.Group):
    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands:  # click's message says what is wrong, not what to do
            raise UserError(f"no command {args[0]!r}: give one of {', '.join(self.commands)}")
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, context_settings=CONTEXT, invoke_without_command=True)
@click.pass_context
def cli(ctx):
    """Qwen3, Qwen3-MoE and QwQ on Apple silicon with MLX."""
    if ctx.invoked_subcommand is None:
        raise UserError(f"give a command: {', '.join(cli.commands)} (--help says what each does)")


def main(command: Optional[str] = None):
    """The mlx-qwen3 script and `python -m mlx_qwen3`; main("generate") is `python -m mlx_qwen3.generate`."""
    # The imports are done (mlx_qwen3/__init__ made a Ctrl-C during them exit quietly): Ctrl-C is click's again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdout is None and (command or (sys.argv[1:2] or [None])[0]) == "generate":
        # started with stdout closed (>&-): run_cli would open /dev/null, and the reply would be lost unseen
        if sys.stderr is not None:
            print("error: cannot write the output: stdout is closed", file=sys.stderr)
        sys.exit(1)
    run_cli(cli if command is None else cli.commands[command])


# ---- generate: a thin shell over stream_generate and ChatSession (the printer and REPL: terminal.py) ----

@cli.command("generate", context_settings=CONTEXT)
@model_option
@click.option("--prompt", default=None, help="The prompt; - reads it from stdin.")
@click.option("--system", default=None, help="A system message.")
@click.option("--max-tokens", type=int, default=8192, show_default=True)
@click.option("--temp", "temperature", type=float, default=None, help="Default: per mode (0.6 thinking, 0.7 not).")
@click.option("--top-p", type=float, default=None, help="Default: per mode (0.95 thinking, 0.8 not).")
@click.option("--top-k", type=int, default=None, help="Default: 20.")
@click.option("--min-p", type=float, default=None, help="Default: 0.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--think/--no-think", "enable_thinking", default=None, help="Default: the model's (thinking on).")
@click.option("--thinking-budget", type=int, default=None, help="End the thought after N tokens.")
@click.option("--loop-guard/--no-loop-guard", default=True, show_default=True,
              help="Notice a reply that loops: a thought is nudged, then closed; an answer stops before it repeats.")
@click.option("--loop-repeats", type=int, default=None,
              help="Copies of a span back to back that make a loop. Default: 3.")
@click.option("--loop-min-tokens", type=int, default=None, help="Tokens those copies must cover. Default: 256.")
@click.option("--loop-recurring", type=int, default=None,
              help="Times a line must recur within --loop-window tokens to make a loop. Default: 32.")
@click.option("--loop-window", type=int, default=None, help="Default: 4096.")
@click.option("--hide-thinking", is_flag=True, help="Do not print the thinking.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line.")
@click.option("--chat", is_flag=True, help="An interactive chat (/think, /no_think, /budget N, /reset, /exit).")
@click.option("--kv-bits", **KV_BITS, help="KV cache bits: auto (16, else the least quantization that fits this "
                                           "Mac's memory for the prompt and --max-tokens), 16, 8 or 4.")
@click.option("--kv-start", type=int, default=0, show_default=True,
              help="With --kv-bits: keep the first N tokens' keys and values 16-bit, then quantize.")
@click.option("--prompt-cache-file", "cache_file", default=None, metavar="F",
              help="Reuse the prompt processed in F (by an earlier run with this model and KV setting) where this "
                   "prompt begins the same; if F does not exist, save this prompt there. F is never rewritten.")
@click.option("--json-schema", "schema_file", default=None, metavar="FILE",
              help="The answer is JSON matching the JSON Schema in FILE, enforced token by token (the thought stays "
                   "free).")
@drafting_options
@rope_option
@pipeline_option
def generate_command(model, prompt, chat, hide_thinking, as_json, pipeline, cache_file, rope, draft_model, schema_file,
                     **options):
    """Generate with a Qwen3 / Qwen3-MoE / QwQ model.

    Launched on several Macs (mlx.launch), the model is split across them; rank 0 reads and prints."""
    cancel = threading.Event()
    group = _follow_rank_0()
    options["num_draft"] = parse_num_draft(options["num_draft"])
    if schema_file is not None:
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema",
                                                                             "schema": read_schema(schema_file)}}
    kv = GenerationOptions.from_kwargs(**options).cache  # bad values fail before the model loads
    if prompt is None and not chat:
        raise UserError("give --prompt TEXT (or --prompt - to read stdin), or --chat")
    made = None if cache_file is None else check_file(cache_file, kv.kv_bits, kv.kv_start, chat)  # a bad file too
    stored = made is not None
    if stored and kv.kv_bits == "auto":  # the file's KV setting (the plan still checks that it fits)
        options.update(kv_bits=made.kv_bits or 16, kv_start=made.kv_start)
    if prompt == "-":
        prompt = read_stdin() if distributed.rank() == 0 else None
    elif prompt is not None:
        check_text(prompt, "--prompt")
    if prompt is not None:
        to_messages(prompt)
    model, tokenizer = load(model, parallel="pipeline" if pipeline else None, rope=rope)
    draft = None if draft_model is None else load_draft(draft_model, model, tokenizer, rope)
    prompt = distributed.share(prompt, distributed.group_of(model))
    prepare_stdout()
    printer = Printer(as_json, hide_thinking, sys.stdout.isatty())
    if not chat:
        prepared = prepare(model, tokenizer, prompt, **options)
        cache = (None if cache_file is None else load_prompt_cache(cache_file, model, prepared.setting) if stored
                 else PromptCache.new(model, prepared.setting))
        result = show_stream(stream_generate(model, tokenizer, prepared, cache=cache, cancel=cancel,
                                             progress=printer.bar, draft_model=draft), printer, cancel)
        if cache_file is not None:
            _keep_prompt(cache_file, stored, cache, prepared.ids, result, model)
        # rank 0 says how it ended; another rank ending non-zero first would make mlx.launch stop rank 0
        return 130 if result.finish_reason == "cancelled" and distributed.rank() == 0 else 0
    session = ChatSession(model, tokenizer, draft_model=draft, **options)
    if cache_file is not None:
        cache = load_prompt_cache(cache_file, model)  # its KV setting checked above; its rope factor by the pool
        session.pool.put(cache)
        note(f"the chat starts from the {len(cache.ids)} prompt tokens in {cache_file}")
    return repl(session, printer, prompt, read=distributed.reader(input, group))


def read_schema(path: str) -> dict:
    """--json-schema's file: a JSON object (whether the engine can compile it is checked once the model is loaded)."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"--json-schema {path} cannot be read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"--json-schema {path} is not JSON: {str(e)[:200]}") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema {path} must hold a JSON Schema object, not {type(schema).__name__}")
    return schema


def _keep_prompt(path, stored: bool, cache, ids: list, result, model):
    """After a run with --prompt-cache-file: say what came from the file, or save the prompt to it (a
    file is never rewritten: the prompt it holds is the prefix its runs were meant to share)."""
    if stored:
        note(f"{result.cached_tokens} of the prompt's {len(ids)} tokens came from {path}")
    elif cache.consistent and cache.ids[: len(ids)] == ids and distributed.rank() == 0:
        save_prompt_cache(path, cache.copy(len(ids)), model)
        note(f"saved the prompt's {len(ids)} tokens to {path}")


def _follow_rank_0():
    """Launched on several processes: the others print nothing and leave Ctrl-C to rank 0, whose stop
    reaches them with its next token. Returns the group (None alone)."""
    group = distributed.group()
    if group is not None:
        distributed.watchdog.on_sigterm(group)
    if group is not None and group.rank() != 0:
        distributed.quiet()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return group


# ---- serve ----

@cli.command("serve", context_settings=CONTEXT)
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Only this machine, unless told. Requests must name this address (or localhost) in their "
                   "Host header; bound to 0.0.0.0 or ::, any Host is accepted.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None,
              help=f"Require 'Authorization: Bearer KEY' on /v1. Visible to `ps`: prefer --api-key-file or "
                   f"${API_KEY_ENV}. Precedence: --api-key, then --api-key-file, then ${API_KEY_ENV}.")
@click.option("--api-key-file", default=None, metavar="FILE", help="Read the API key from the first line of FILE.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API, with CORS "
                   "answers. Repeatable. Other pages are refused (403); the chat page at / always works.")
@click.option("--parallel", type=click.IntRange(1), default=PARALLEL, show_default=True,
              help="Requests decoded together, one forward pass for all (the batch width); more wait in a "
                   "queue. Each holds its own KV cache: the memory plan admits only what fits.")
@click.option("--prompt-cache", "cache_slots", type=click.IntRange(0), default=CACHE_SLOTS, show_default=True,
              help="Finished prompts whose KV cache is kept for reuse.")
@click.option("--prompt-cache-gb", type=click.FloatRange(0), default=None,
              help="At most this many GiB for them (default: a quarter of the memory the weights leave free).")
@click.option("--kv-bits", **KV_BITS, help="Each request's KV cache bits unless it says: auto (16, else the least "
                                           "quantization that fits), 16, 8 or 4.")
@click.option("--kv-start", type=int, default=0, show_default=True,
              help="With --kv-bits: keep the first N tokens' keys and values 16-bit, then quantize.")
@click.option("--served-model-name", "served_names", multiple=True, metavar="NAME",
              help="Another id /v1/models lists for the model (repeatable). Requests are served whatever model "
                   "they name; answers name --model.")
@drafting_options
@rope_option
@pipeline_option
def serve_command(model, host, port, api_key, api_key_file, allow_origins, parallel, cache_slots, prompt_cache_gb,
                  kv_bits, kv_start, served_names, rope, pipeline, draft_model, prompt_lookup, num_draft):
    """An OpenAI-compatible server for one Qwen3 / Qwen3-MoE / QwQ model.

    The first Ctrl-C (or SIGTERM) cancels every generation, answers its client and exits 0. Launched on
    several Macs (mlx.launch), rank 0 serves and the others follow its rounds; its stop ends theirs."""
    from .server.follow import follow

    cache_bytes = None if prompt_cache_gb is None else int(prompt_cache_gb * 2**30)
    drafting = Drafting(prompt_lookup, parse_num_draft(num_draft))  # bad values fail before the model loads
    CacheOptions(kv_bits, kv_start)
    group = _follow_rank_0()
    if group is not None and group.rank() != 0:  # no port: this rank runs rank 0's rounds until its stop
        m, tokenizer = load(model, parallel="pipeline" if pipeline else None, rope=rope)
        draft = None if draft_model is None else load_draft(draft_model, m, tokenizer, rope)
        return follow(m, tokenizer, cache_slots, cache_bytes, draft)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError('the server needs its extra: pip install "mlx-qwen3[server]"') from None
    api_key = api_key_from(api_key, api_key_file)
    for origin in allow_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+/?", origin):
            raise UserError(f"--allow-origin {origin!r} is not an origin: give scheme://host[:port], "
                            "e.g. http://localhost:3000, or *")
    m, tokenizer = load(model, parallel="pipeline" if pipeline else None, rope=rope)
    draft = None if draft_model is None else load_draft(draft_model, m, tokenizer, rope)
    app = create_app(m, tokenizer, model, api_key, cache_slots=cache_slots, cache_bytes=cache_bytes,
                     parallel=parallel, host=host, allow_origins=allow_origins, kv_bits=kv_bits, kv_start=kv_start,
                     draft_model=draft, prompt_lookup=drafting.prompt_lookup, num_draft=drafting.num_draft,
                     served_names=served_names)
    print(f"serving {model} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    make_server(app, host, port).run()
    if not app.state.engine.stop(timeout=2):  # a step that would not end (a long prefill): do not wait for it
        print("the generation thread did not stop in 2 s; exiting without it", file=sys.stderr, flush=True)
        os._exit(0)


# ---- convert ----

def _interrupt(*_):
    raise KeyboardInterrupt


@cli.command("convert", context_settings=CONTEXT)
@click.option("--hf-path", required=True, help="Hugging Face model folder or Hub id.")
@click.option("--mlx-path", required=True, help="The MLX folder to create.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize (4-bit, group size 64 unless told).")
@click.option("--bits", type=int, default=4, show_default=True, help="4 or 8.")
@click.option("--group-size", type=int, default=64, show_default=True, help="32, 64 or 128.")
@click.option("--dtype", default=None, help="bfloat16, float16 or float32 for what stays float.")
@click.option("--mixed", default=None, help="A mixed recipe, e.g. mixed_4_6 (implies -q).")
@click.option("--quantize-embeddings/--float-embeddings", default=True, show_default=True,
              help="Quantize embed_tokens and lm_head too.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path.")
def convert_command(hf_path, mlx_path, quantize, bits, group_size, dtype, mixed, quantize_embeddings, force):
    """Convert a Hugging Face Qwen3 / Qwen3-MoE / QwQ checkpoint to MLX."""
    # Ctrl-C and kill end the conversion the same way: the partial folder is removed, nothing is left.
    signal.signal(signal.SIGTERM, _interrupt)
    path = None
    try:
        with convert_progress(sys.stderr) as progress:  # a bar on a terminal, erased before anything else is said
            path = convert(hf_path, mlx_path, quantize, bits, group_size, dtype, mixed, quantize_embeddings, force,
                           progress=progress)
        print(f"wrote {path}")
    except Interrupted as e:
        print(f"interrupted; {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before anything was written, or after all of it
        print(f"interrupted; {path} holds the new conversion" if path else "interrupted; nothing was written",
              file=sys.stderr)
        sys.exit(130)


# ---- info, selftest, menubar ----

@cli.command("info", context_settings=CONTEXT)
@click.argument("model")
def info_command(model):
    """Load MODEL (a folder or Hub id) and print what it is, as JSON."""
    m, config = load_model(model, lazy=True)
    print(json.dumps({
        "model_type": config["model_type"],
        "layers": len(m.layers),
        "weight_bytes": weight_bytes(m),
        "quantization": config.get("quantization"),
    }))


@cli.command("plan", context_settings=CONTEXT)
@model_option
@click.option("--context", type=click.IntRange(1), default=None,
              help="Tokens of prompt and reply to plan for (default: the model's context window).")
@click.option("--json", "as_json", is_flag=True, help="The plan as one JSON object.")
def plan_command(model, context, as_json):
    """Whether MODEL fits this Mac at a context length, for each KV cache setting: weights + KV cache +
    working memory against what Metal keeps resident (MLX_QWEN3_MEMORY_GB overrides). A Hub model is
    planned from its config and safetensors headers, without downloading its weights."""
    from .checkpoint import describe
    from .load import model_args
    from .memory import plan, usable_memory

    config, weights = describe(model)
    _, args = model_args(config)
    window = args.context_window
    if context is not None and context > window:
        raise UserError(f"--context {context:,} is more than {model}'s context window, {window:,} tokens")
    context = context or window
    limit = usable_memory()
    rows = plan(args, weights, context, limit)
    if as_json:
        print(json.dumps({"model": model, "weight_bytes": weights, "memory_limit_bytes": limit,
                          "context": context, "kv": rows}))
        return 0
    gb = lambda n: f"{n / 2**30:.1f} GB"  # noqa: E731
    print(f"{model}: weights {gb(weights)}; this machine keeps {gb(limit)} resident; context {context:,} tokens")
    print(f"{'KV cache':<10}{'KV':>10}{'total':>10}  {'fits':<5}{'longest context that fits':>27}")
    for r in rows:
        name = "float16" if r["kv_bits"] == 16 else f"{r['kv_bits']}-bit"
        print(f"{name:<10}{gb(r['kv_bytes']):>10}{gb(r['total_bytes']):>10}  {'yes' if r['fits'] else 'no':<5}"
              f"{r['longest_context']:>27,}")
    if not any(r["fits"] for r in rows):
        longest = max(rows, key=lambda r: r["longest_context"])
        print(f"nothing fits {context:,} tokens; at most {longest['longest_context']:,} with a "
              f"{longest['kv_bits']}-bit KV cache", file=sys.stderr)
    return 0


@cli.command("selftest", context_settings=CONTEXT)
@click.option("--model", default=None, help="Also time whole-model decode on this model.")
@click.option("--tokens", type=int, default=64, show_default=True)
@click.option("--iters", type=int, default=20, show_default=True)
@click.option("--ops/--no-ops", default=True, show_default=True, help="Check and time each kernel.")
def selftest_command(model, tokens, iters, ops):
    """Check each custom kernel against MLX's built-ins and time both; print JSON."""
    report = {"environment": environment()}
    if ops:
        report["ops"] = op_report(DEFAULT_SHAPES, iters=iters)
    if model:
        report["model"] = model_report(model, tokens)
    report["stored_choices"] = stored_choices()
    print(json.dumps(report, indent=2))


@cli.command("menubar", context_settings=CONTEXT)
@model_option
def menubar_command(model):
    """A menubar assistant: ask from the status bar, watch the answer stream in."""
    if sys.platform != "darwin":
        raise UserError("the menubar assistant runs on macOS; use python -m mlx_qwen3.server elsewhere")
    try:
        import rumps
    except ImportError:
        raise UserError('the menubar assistant needs its extra: pip install "mlx-qwen3[menubar]"') from None
    m, tokenizer = load(model)
    MenubarApp(rumps, AssistantController(m, tokenizer, model)).run()
