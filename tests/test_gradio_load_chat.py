"""Gradio's ``gr.load_chat`` (named in README) on the server, driven in headless Chromium for two turns.

From the second turn on Gradio resends the earlier messages with
``"metadata": null, "options": null``; the server takes them as the plain
conversation. Runs where the browser tests run (``.ci/web.sh``); skipped
where Chromium, the ``[web]`` extra or Playwright is missing, as
``test_web_browser.py`` is.
"""

from modelscope_llama2.constants import DEMO_DIR
from modelscope_llama2.serving.server import build_app
from tests.helpers import HANGZHOU, PLACES, SIGHTS, ZHEJIANG, running_server
from tests.test_web_browser import WAIT_MS, App, browser  # noqa: F401  (browser: the fixture)

KEY = "sk-gradio"
# What README shows: the chat page for any OpenAI-compatible server.
LOAD_CHAT = ("import os, sys, gradio as gr; gr.load_chat(sys.argv[1], model='demo', token=sys.argv[2])"
             ".launch(server_name='127.0.0.1', server_port=int(os.environ['GRADIO_SERVER_PORT']))")
READ_CHAT = """() => [...document.querySelectorAll('[data-testid="user"], [data-testid="bot"]')]
    .map(e => [e.dataset.testid, e.innerText.trim()])"""


def test_load_chat_holds_a_two_turn_conversation(browser, tmp_path):  # noqa: F811
    with running_server(build_app(DEMO_DIR, "demo", api_key=KEY)) as url:
        app = App(["-c", LOAD_CHAT, url + "/v1", KEY], str(tmp_path / "gradio.log"))
        page = browser.new_page()
        try:
            page.set_default_timeout(WAIT_MS)
            page.goto(app.url)
            shown = []
            for question, answer in ((ZHEJIANG, HANGZHOU), (PLACES, SIGHTS)):
                page.fill("textarea", question)
                page.press("textarea", "Enter")
                shown += [["user", question], ["bot", answer]]
                try:
                    page.wait_for_function(f"shown => JSON.stringify(({READ_CHAT})()) === JSON.stringify(shown)",
                                           arg=shown, polling=250)
                except Exception as error:  # Playwright's timeout: say what the page showed instead
                    raise AssertionError(f"the page shows {page.evaluate(READ_CHAT)}, not {shown}; app log:\n"
                                         f"{app.log()}") from error
        finally:
            page.close()
            app.stop()
