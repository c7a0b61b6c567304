"""Open WebUI's chat page with its default settings, typed into as a user does, answered by the server.

By default the page sends Open WebUI's ~35 built-in tools with every message
(no ``tool_choice``: ``auto``), streamed, and after an answer asks the same
model for a title, tags and follow-up suggestions. Each answer shown must be
the demo checkpoint's own, exactly; on the server's side its log shows the
tools arrived (with the demo's 512-piece vocabulary they take more than its
4096-token context, so ``auto`` leaves them out and the model answers in
text) and that every request, the title's and the follow-ups' too, got a 200.
"""

import re
import time

from modelscope_llama2.constants import DEMO_DIR
from tests.helpers import HANGZHOU, PLACES, SIGHTS, ZHEJIANG
from tests.openwebui.conftest import WAIT_MS, access_log

# The shown chat as (role, text) pairs; an answer's text is its rendered markdown.
READ_CHAT = """() => [...document.querySelectorAll('.chat-user, .chat-assistant')].map(e => [
    e.classList.contains('chat-user') ? 'user' : 'assistant',
    (e.querySelector('.markdown-prose') || e).innerText.trim()])"""
# The server's warning when a request's tools (tool_choice "auto") take more than the context.
TOOLS_LEFT_OUT = ("tool definitions do not fit in the context with the messages; answering without them "
                  "(tool_choice 'auto')")
CHAT = "/v1/chat/completions"
# What Open WebUI shows as the answer when the server cannot be reached.
CONNECTION_ERROR = "Open WebUI: Server Connection Error"


class ChatPage:
    """A new chat in Open WebUI (one browser tab)."""

    def __init__(self, browser, url, log):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(WAIT_MS)
        self.log = log  # what to show when a wait fails
        self.page.goto(url)
        self.page.wait_for_selector("#chat-input")

    def send(self, text):
        self.page.click("#chat-input")
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")

    def chat(self):
        return self.page.evaluate(READ_CHAT)

    def wait_for_chat(self, shown):
        try:
            self.page.wait_for_function(f"shown => JSON.stringify(({READ_CHAT})()) === JSON.stringify(shown)",
                                        arg=shown, polling=250)
        except Exception as error:  # Playwright's timeout: say what the page and the servers showed instead
            raise AssertionError(f"the page shows {self.chat()}, not {shown}; logs:\n{self.log()}") from error

    def close(self):
        self.page.close()


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


def logs(server, openwebui):
    return lambda: f"{server.log()[-3000:]}\n--- Open WebUI:\n{openwebui.log()[-3000:]}"


def test_two_turns_answered_with_tools_sent(browser, chat_page_url, server, openwebui):
    before = (len(access_log(server, CHAT)), server.log().count(TOOLS_LEFT_OUT))
    page = ChatPage(browser, chat_page_url, logs(server, openwebui))
    try:
        page.send(ZHEJIANG)
        page.wait_for_chat([["user", ZHEJIANG], ["assistant", HANGZHOU]])
        page.send(PLACES)
        page.wait_for_chat([["user", ZHEJIANG], ["assistant", HANGZHOU], ["user", PLACES], ["assistant", SIGHTS]])
    finally:
        page.close()
    # Per turn the answer (tools, streamed) and the follow-up suggestions; after the first, a title and tags.
    wait_until(lambda: len(access_log(server, CHAT)) - before[0] >= 6, WAIT_MS / 1000,
               "the title, tags and follow-up requests")
    assert access_log(server, CHAT)[before[0]:] == [200] * 6
    # Open WebUI's built-in tools came with both questions (Open WebUI 0.12.4 has 36).
    left_out = [int(n) for n in re.findall(r"tools: the (\d+) " + re.escape(TOOLS_LEFT_OUT), server.log())]
    assert len(left_out) - before[1] == 2 and min(left_out[before[1]:]) >= 30, left_out


def test_a_turn_that_failed_does_not_end_the_chat(browser, chat_page_url, server, openwebui):
    """The server restarts mid-chat: Open WebUI's next request holds the unanswered question and the new one."""
    from modelscope.pipelines import pipeline

    import modelscope_llama2  # noqa: F401  (registers the pipeline)

    page = ChatPage(browser, chat_page_url, logs(server, openwebui))
    try:
        server.stop()
        try:
            page.send(ZHEJIANG)
            page.wait_for_chat([["user", ZHEJIANG], ["assistant", CONNECTION_ERROR]])
        finally:
            server.start()
        before = len(access_log(server, CHAT))
        page.send(PLACES)
        # The two questions are one user turn: the answer is the one chat() gives to them joined.
        joined = pipeline("chat", model=DEMO_DIR)({"text": f"{ZHEJIANG}\n\n{PLACES}"})["response"]
        page.wait_for_chat([["user", ZHEJIANG], ["assistant", CONNECTION_ERROR], ["user", PLACES],
                            ["assistant", joined]])
        wait_until(lambda: len(access_log(server, CHAT)) > before, 30, "the server's log line")
        assert access_log(server, CHAT)[before] == 200
    finally:
        page.close()
