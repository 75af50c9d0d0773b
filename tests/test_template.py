"""Our chat-template rendering against transformers' apply_chat_template, on Qwen3's own template."""

import pytest
from chain import tokenizer
from checkpoints import TOKENIZER_DIR

from mlx_qwen3 import UserError
from mlx_qwen3.tokenizer import CHATML_TEMPLATE, Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "history with thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "3+3? /no_think"},
    ],
    "thinking inline in content": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"},
        {"role": "user", "content": "again"},
    ],
    "tool round trip": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}


@pytest.fixture(scope="module")
def reference():
    tokenizer()  # skips when the real tokenizer is missing
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_rendering_equals_transformers(reference, name, thinking, tools):
    messages = CONVERSATIONS[name]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ours = tokenizer().apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs)
    theirs = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
    assert ours == theirs


def test_a_model_without_a_template_gets_chatml_with_a_warning(caplog):
    tok = tokenizer()
    bare = Tokenizer(tok._tok, {}, None)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = bare.apply_chat_template(messages[:1])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "no chat template" in caplog.text
    # the fallback is CHATML_TEMPLATE itself: the same text as a tokenizer that ships it as its own
    assert bare.chat_template is None
    chatml = Tokenizer(tok._tok, {}, CHATML_TEMPLATE)
    for kwargs in ({}, {"add_generation_prompt": False}):
        assert bare.apply_chat_template(messages, **kwargs) == chatml.apply_chat_template(messages, **kwargs)
    assert bare.apply_chat_template(messages, add_generation_prompt=False).endswith("Hello<|im_end|>\n")


def test_a_template_error_is_one_clear_line():
    tok = tokenizer()
    bad = Tokenizer(tok._tok, {}, "{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(UserError, match="the chat template refused the conversation: only user and assistant roles"):
        bad.apply_chat_template([{"role": "user", "content": "Hi"}])


def _named_templates_folder(tmp_path, layout):
    """The real tokenizer with Qwen3's template as "default" and a variant as "tool_use", in either of
    the layouts Hugging Face writes: a list in tokenizer_config.json, or .jinja files."""
    import json
    import shutil

    tokenizer()  # skips when the real tokenizer is missing
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    default = cfg.pop("chat_template")
    tool_use = "TOOL TEMPLATE\n" + default
    if layout == "list":
        cfg["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    else:
        (tmp_path / "chat_template.jinja").write_text(default)
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("layout", ["list", "files"])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_named_templates_are_picked_as_transformers_picks_them(tmp_path, layout, tools):
    from transformers import AutoTokenizer

    folder = _named_templates_folder(tmp_path, layout)
    messages = CONVERSATIONS["tool round trip"]
    ours = Tokenizer.from_folder(folder).apply_chat_template(messages, tools=tools)
    theirs = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert ours.startswith("TOOL TEMPLATE") == (tools is not None)


@pytest.mark.parametrize("template,error", [
    ("{{ messages + 1 }}", "TypeError: can only concatenate list"),
    ("{{ 1 // (messages | length - 1) }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_any_failure_of_a_template_is_one_clear_line(template, error):
    tok = tokenizer()
    bad = Tokenizer(tok._tok, {}, template)
    with pytest.raises(UserError, match=f"the chat template (failed on|refused) this conversation.*({error})") as e:
        bad.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(e.value)
