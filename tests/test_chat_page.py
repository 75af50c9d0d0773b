"""The chat page at /, in headless Chromium: type, send, see thinking and answer land in their places;
Markdown, replies that hold HTML, conversations kept across reloads, the figures under each reply."""

import json
import shutil

import httpx
import pytest
from chain import build, ids_of, successors, tokenizer
from requires import requires

from mlx_qwen3 import load

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = requires(bool(CHROMIUM and DRIVER),
                      "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _tail(tok, **kwargs):
    """The prompt's last token, which the scripted model's reply follows."""
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], **kwargs))[-1]


MARKDOWN = "Some **bold** and `code`:\n ```python\nprint(1)\n```\n* See [docs](https://example.com/a)"
HOSTILE_THOUGHT = "<script>alert(2)</script>"
HOSTILE = 'Look: <img src=x onerror="window.pwned=1"> here'


@pytest.fixture(scope="module")
def markdown_model(tmp_path_factory):
    """Answers MARKDOWN with thinking off."""
    tok = tokenizer()
    script = [_tail(tok, enable_thinking=False)] + ids_of(tok, [MARKDOWN, "<|im_end|>"])
    return load(build(tmp_path_factory.mktemp("markdown"), successors(script), max_position_embeddings=256))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Thinks HOSTILE_THOUGHT and answers HOSTILE, both HTML that must stay text."""
    tok = tokenizer()
    script = [_tail(tok)] + ids_of(tok, ["<think>", HOSTILE_THOUGHT, "</think>", HOSTILE, "<|im_end|>"])
    return load(build(tmp_path_factory.mktemp("hostile"), successors(script), max_position_embeddings=256))


def _open(driver, url):
    """The page with no stored chats (a port can come back in a later test, and its origin with it)."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")


def _answer(driver, n, text):
    """Waits until the page shows n replies, the last of them done and reading `text`."""
    return _wait_for(driver, f"const a = document.querySelectorAll('.assistant .answer');"
                             f"return a.length === {n} && a[{n - 1}].textContent === {text!r} "
                             f"&& !document.getElementById('send').disabled")


def _send(driver, text):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _wait_for(driver, script, timeout=120, fail_on_error=True):
    """Polls script until it returns something true; fails at once on an error shown in the page
    (unless told not to), and on timeout with what the page shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        error = d.execute_script("const e = document.querySelector('.msg.error'); return e && e.textContent")
        if error and fail_on_error:
            pytest.fail(f"the page shows an error: {error}")
        return d.execute_script(script)

    try:
        return WebDriverWait(driver, timeout).until(done)
    except TimeoutException:
        shown = driver.execute_script("return document.getElementById('log').innerText")
        console = [entry["message"] for entry in driver.get_log("browser")]
        pytest.fail(f"after {timeout} s the page shows {shown!r}; its console: {console}")


def test_thinking_and_answer_arrive_in_their_places(answering, serve, browser, tmp_path):
    with serve(*answering) as url:
        browser.get(url + "/")
        assert browser.find_element("id", "model").text == "qwen3-tiny"
        _send(browser, "What is 2+2?")
        answer = _wait_for(browser, "const a = document.querySelector('.assistant .answer');"
                                    "return a && a.textContent === 'The answer is 4.' && a.textContent")
        assert answer == "The answer is 4."
        thought = browser.execute_script("return document.querySelector('.assistant details.thinking .thought').textContent")
        assert thought == "Let me think"
        hidden = browser.execute_script("return document.querySelector('.assistant details.thinking').hidden")
        assert hidden is False
        browser.save_screenshot(str(tmp_path / "chat_page.png"))

        # thinking off: the next reply comes without a thinking block
        browser.find_element("id", "think").click()
        _wait_for(browser, "return !document.getElementById('send').disabled")
        _send(browser, "Hello")
        _wait_for(browser, "const a = document.querySelectorAll('.assistant .answer');"
                           "return a.length === 2 && a[1].textContent === 'Hi there!'")
        hidden = browser.execute_script("return document.querySelectorAll('.assistant details.thinking')[1].hidden")
        assert hidden is True


def test_api_key_field(answering, serve, browser):
    with serve(*answering, api_key="sesame") as url:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear(); document.getElementById('key').value = '';")
        _send(browser, "What is 2+2?")
        error = _wait_for(browser, "const e = document.querySelector('.msg.error'); return e && e.textContent",
                          fail_on_error=False)
        assert "Authorization" in error
        key = browser.find_element("id", "key")
        key.send_keys("sesame")
        _send(browser, "What is 2+2?")
        _wait_for(browser, "const a = document.querySelectorAll('.assistant .answer');"
                           "return a.length === 2 && a[1].textContent === 'The answer is 4.'", fail_on_error=False)
        browser.get(url + "/")  # the key is remembered
        assert browser.find_element("id", "key").get_attribute("value") == "sesame"


def test_markdown_answer_with_a_code_block_and_copy_button(markdown_model, serve, browser):
    with serve(*markdown_model) as url:
        _open(browser, url)
        browser.find_element("id", "think").click()
        _send(browser, "Show me")
        _answer(browser, 1, "Some bold and code:pythonCopyprint(1)See docs")  # textContent: no line breaks
        html = browser.execute_script("return document.querySelector('.assistant .answer').innerHTML")
        assert "<p>Some <strong>bold</strong> and <code>code</code>:</p>" in html
        assert browser.execute_script("return document.querySelector('.answer pre > code').textContent") == "print(1)"
        assert browser.execute_script("return document.querySelector('.answer pre > code').dataset.lang") == "python"
        link = browser.execute_script("const a = document.querySelector('.answer li a');"
                                      "return [a.href, a.rel, a.target, a.textContent]")
        assert link == ["https://example.com/a", "noopener noreferrer", "_blank", "docs"]

        # the copy button, through navigator.clipboard, then the way pages served over plain http must use
        browser.execute_script("window.copied = [];"
                               "Object.defineProperty(navigator, 'clipboard', {configurable: true, value:"
                               " {writeText: async (t) => { window.copied.push(['clipboard', t]); }}});")
        browser.find_element("css selector", ".answer .code .copy").click()
        _wait_for(browser, "return document.querySelector('.answer .copy').textContent === 'Copied'")
        browser.execute_script("Object.defineProperty(navigator, 'clipboard', {configurable: true, value: undefined});"
                               "const original = document.execCommand.bind(document);"
                               "document.execCommand = (command) => {"
                               "  const area = document.querySelector('body > textarea');"
                               "  const chosen = area.value.slice(area.selectionStart, area.selectionEnd);"
                               "  window.copied.push([command, chosen]);"
                               "  return original(command); };")
        _wait_for(browser, "return document.querySelector('.answer .copy').textContent === 'Copy'")
        browser.find_element("css selector", ".answer .code .copy").click()
        _wait_for(browser, "return window.copied.length === 2")
        assert browser.execute_script("return window.copied") == [["clipboard", "print(1)"], ["copy", "print(1)"]]
        assert browser.execute_script("return document.querySelectorAll('body > textarea').length") == 0


def test_html_in_a_reply_stays_text(hostile, serve, browser):
    with serve(*hostile) as url:
        _open(browser, url)
        _send(browser, "Say something odd")
        _answer(browser, 1, HOSTILE)
        for shown in ("the reply as it streamed", "the reply restored from storage"):
            thought = browser.execute_script("return document.querySelector('.assistant .thought').textContent")
            assert thought == HOSTILE_THOUGHT, shown
            injected = browser.execute_script("return document.querySelectorAll('#log img, #log script').length")
            assert injected == 0, shown
            assert browser.execute_script("return window.pwned === undefined"), shown
            browser.get(url + "/")
            _answer(browser, 1, HOSTILE)


def test_the_page_runs_its_own_script_and_nothing_else(answering, serve, browser):
    """Its Content-Security-Policy names its script and style by hash: HTML that ever got into the page (here put
    there on purpose) runs nothing, while the page itself, its Markdown and its copy button work without a
    complaint from the browser."""
    import time

    with serve(*answering) as url:
        policy = httpx.get(url + "/").headers["content-security-policy"]
        assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy and "connect-src 'self'" in policy
        _open(browser, url)
        browser.get_log("browser")  # what came before
        _send(browser, "What is 2+2?")
        _answer(browser, 1, "The answer is 4.")
        assert not [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        browser.execute_script("document.getElementById('log').insertAdjacentHTML('beforeend', "
                               "'<img src=/nothing onerror=\"window.pwned = 1\">')")
        deadline = time.time() + 10
        while not (refused := [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]):
            assert time.time() < deadline, "the browser never refused the injected handler"
            time.sleep(0.1)
        assert browser.execute_script("return window.pwned === undefined"), refused


def test_conversations_are_kept_across_reloads(answering, serve, browser):
    titles = "return [...document.querySelectorAll('#chats li')].map((li) => [li.textContent, li.className])"
    with serve(*answering) as url:
        _open(browser, url)
        _send(browser, "What is 2+2?")
        _answer(browser, 1, "The answer is 4.")
        browser.get(url + "/")
        _answer(browser, 1, "The answer is 4.")
        assert browser.execute_script("return document.querySelector('.msg.user').textContent") == "What is 2+2?"
        assert browser.execute_script(titles) == [["What is 2+2?×", "current"]]
        # the restored conversation goes on: the question and answer before are sent again
        first = browser.execute_script("return document.querySelector('.stats').textContent")
        _send(browser, "And again?")
        _answer(browser, 2, "The answer is 4.")
        second = browser.execute_script("return document.querySelectorAll('.stats')[1].textContent")
        prompt = lambda stats: int(stats.split(" prompt tokens")[0].split(" · ")[-1])
        assert prompt(second) > prompt(first) + 10, (first, second)

        browser.find_element("id", "new").click()
        assert browser.execute_script("return document.getElementById('log').children.length") == 0
        assert browser.execute_script(titles) == [["What is 2+2?×", ""]]
        browser.find_element("id", "think").click()
        _send(browser, "Hello")
        _answer(browser, 1, "Hi there!")
        browser.get(url + "/")
        _answer(browser, 1, "Hi there!")
        assert browser.execute_script(titles) == [["Hello×", "current"], ["What is 2+2?×", ""]]

        browser.find_elements("css selector", "#chats li .title")[1].click()
        _answer(browser, 2, "The answer is 4.")
        assert browser.execute_script(titles) == [["Hello×", ""], ["What is 2+2?×", "current"]]  # newest first
        browser.find_elements("css selector", "#chats li .delete")[0].click()
        assert browser.execute_script(titles) == [["What is 2+2?×", "current"]]
        _answer(browser, 2, "The answer is 4.")
        browser.find_elements("css selector", "#chats li .delete")[0].click()
        assert browser.execute_script(titles) == []
        assert browser.execute_script("return document.getElementById('log').children.length") == 0
        browser.get(url + "/")
        assert browser.execute_script(titles) == []


GOOD = {"id": "a", "title": "kept", "updated": 1, "turns": [
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "", "calls": []}]}
BAD = {"id": "b", "title": "dropped", "updated": 2, "turns": [{"role": "user"}]}


@pytest.mark.parametrize("stored, kept", [
    ("{not json", []), ("[]", []), (json.dumps({"version": 0, "chats": [GOOD]}), []),
    (json.dumps({"version": 1, "chats": [GOOD, BAD, None, "x"]}), ["kept"]),
    (json.dumps({"version": 1, "chats": [GOOD]}), ["kept"]),  # what was set is what the page reads
])
def test_unreadable_storage_starts_fresh(answering, serve, browser, stored, kept):
    with serve(*answering) as url:
        _open(browser, url)
        browser.get_log("browser")  # what came before
        browser.execute_script("localStorage.setItem('mlx-qwen3-chats', arguments[0])", stored)
        browser.get(url + "/")
        titles = browser.execute_script("return [...document.querySelectorAll('#chats .title')]"
                                        ".map((t) => t.textContent)")
        assert titles == kept
        assert browser.execute_script("return document.querySelectorAll('#log > *').length") == 0
        _send(browser, "What is 2+2?")
        _answer(browser, 1, "The answer is 4.")
        assert browser.execute_script("return document.querySelectorAll('#chats .title').length") == len(kept) + 1
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []


def test_figures_under_a_reply_are_the_servers(answering, serve, browser):
    with serve(*answering) as url:
        _open(browser, url)
        _send(browser, "What is 2+2?")
        _answer(browser, 1, "The answer is 4.")
        stats = browser.execute_script("return document.querySelector('.assistant .stats').textContent")
        body = {"messages": [{"role": "user", "content": "What is 2+2?"}]}
        usage = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
        thinking = usage["completion_tokens_details"]["reasoning_tokens"]
        assert thinking > 0
        assert stats.startswith(f"{usage['completion_tokens']} tokens ({thinking} thinking) · "
                                f"{usage['prompt_tokens']} prompt tokens"), stats
        assert stats.endswith(" s to first token"), stats


def test_stop_keeps_the_reply_so_far(looping, serve, browser):
    with serve(*looping) as url:
        _open(browser, url)
        browser.find_element("id", "think").click()
        _send(browser, "Go on")
        _wait_for(browser, "return document.querySelector('.assistant .answer').textContent.length > 20")
        browser.find_element("id", "stop").click()
        _wait_for(browser, "return !document.getElementById('send').disabled")
        assert browser.execute_script("return document.querySelector('.stats').textContent").startswith("stopped")
        shown = browser.execute_script("return document.querySelector('.assistant .answer').textContent")
        assert shown.startswith("a ba b")
        browser.get(url + "/")
        assert browser.execute_script("return document.querySelector('.assistant .answer').textContent") == shown


A = 'target="_blank" rel="noopener noreferrer"'
CODE = ('<div class="code"><div class="bar"><span class="lang">{}</span>'
        '<button class="copy" type="button">Copy</button></div>')
RENDERED = [  # Markdown -> the HTML the page builds for it
    ("# Title\n## Sub ##\n#tag", "<h1>Title</h1><h2>Sub</h2><p>#tag</p>"),
    ("one\ntwo\n\n*em* _em_ snake_case_name __strong__ ~~gone~~",
     "<p>one\ntwo</p><p><em>em</em> <em>em</em> snake_case_name <strong>strong</strong> <del>gone</del></p>"),
    ("- a\n- b\n  - nested\n- c", "<ul><li>a</li><li>b<ul><li>nested</li></ul></li><li>c</li></ul>"),
    ("Steps:\n5. five\n6. six", '<p>Steps:</p><ol start="5"><li>five</li><li>six</li></ol>'),
    ("> quoted\nlazy\n\nafter", "<blockquote><p>quoted\nlazy</p></blockquote><p>after</p>"),
    ("[ok](https://a.b/c?d=1&e=2) <https://auto.link> see https://x.org/y.",
     f'<p><a href="https://a.b/c?d=1&amp;e=2" {A}>ok</a> <a href="https://auto.link/" {A}>https://auto.link</a> '
     f'see <a href="https://x.org/y" {A}>https://x.org/y</a>.</p>'),
    # only http and https become links
    ("[js](javascript:alert(1)) [data](data:text/html,x) [rel](/x)", "<p>js data rel</p>"),
    ("`<b>x</b>` `` a`b `` \\*not em\\*", "<p><code>&lt;b&gt;x&lt;/b&gt;</code> <code>a`b</code> *not em*</p>"),
    ("| a | b |\n|---|--:|\n| 1 | **2** |",
     '<div class="table"><table><thead><tr><th>a</th><th style="text-align: right;">b</th></tr></thead>'
     '<tbody><tr><td>1</td><td style="text-align: right;"><strong>2</strong></td></tr></tbody></table></div>'),
    ("---", "<hr>"),
    ("~~~js\nx < 1\n~~~\ntext", CODE.format("js") + '<pre><code data-lang="js">x &lt; 1</code></pre></div><p>text</p>'),
    ("```\nstill streaming", CODE.format("") + "<pre><code>still streaming</code></pre></div>"),
    ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>',
     '<p>&lt;img src=x onerror="window.pwned=1"&gt;&lt;script&gt;window.pwned=2&lt;/script&gt;</p>'),
    ('[<img src=x onerror="window.pwned=3">](https://a.b)',
     f'<p><a href="https://a.b/" {A}>&lt;img src=x onerror="window.pwned=3"&gt;</a></p>'),
]


def test_markdown_renderer(answering, serve, browser):
    render = "const box = document.createElement('div'); box.append(markdown(arguments[0])); return box.innerHTML"
    with serve(*answering) as url:
        _open(browser, url)
        for text, html in RENDERED:
            assert browser.execute_script(render, text) == html, text
        # nesting past what a page needs is shown as text rather than recursing without end
        deep = browser.execute_script("const box = document.createElement('div'); box.append(markdown(arguments[0]));"
                                      "return [box.querySelectorAll('blockquote').length, box.textContent.length]",
                                      "> " * 5000 + "x")
        assert deep[0] <= 20 and deep[1] > 0
        assert browser.execute_script("return window.pwned === undefined")


def test_two_tabs_keep_each_others_chats(answering, serve, browser):
    titles = "return [...document.querySelectorAll('#chats .title')].map((t) => t.textContent)"
    with serve(*answering) as url:
        _open(browser, url)
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(url + "/")
        _send(browser, "What is 2+2?")
        _answer(browser, 1, "The answer is 4.")
        browser.close()
        browser.switch_to.window(first)
        _wait_for(browser, "return document.querySelectorAll('#chats .title').length === 1")  # the other tab's
        assert browser.execute_script(titles) == ["What is 2+2?"]
        browser.find_element("id", "think").click()
        _send(browser, "Hello")
        _answer(browser, 1, "Hi there!")
        browser.get(url + "/")
        assert browser.execute_script(titles) == ["Hello", "What is 2+2?"]
