"""The chat app driven with Textual's Pilot on a tiny random model with a real tokenizer, and
snapshots of its main screens.

The model's replies are random bytes; what is checked is the plumbing: what reaches the
screen and the history, and what `model.generate` is asked for (a spy wraps it).
"""
import asyncio
import functools
import threading
import time

import pytest

import qlite
from conftest import save_tiny
from qlite.errors import QliteError
from qlite.history import History
from qlite.tui import (ChatApp, ChatInput, ChatScreen, ConfirmScreen, ConversationList,
                       HelpScreen, LoadingScreen, MessageBox, PromptScreen, SearchScreen,
                       SettingsScreen)

SIZE = (110, 32)


def sync(test):
    """Run an async test in its own event loop (no pytest-asyncio needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a fixed directory name: the status bar shows it, and the snapshots with it
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    path.mkdir()
    save_tiny(path)
    return path


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    """Never touch the real ~/.local/share: the history goes under the test's tmp dir."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


class Spy:
    """A loader that returns the real tiny model with `generate` wrapped: each call's messages
    and keyword arguments are recorded, and so is every text piece it yields.
    `hold` makes the generation wait after its first piece until it is cancelled (so a test can
    stop it mid-stream); `fail` makes it raise."""

    def __init__(self, hold=False, fail=None):
        self.calls, self.pieces = [], []
        self.hold, self.fail = hold, fail
        self.max_new_tokens = 24
        self.finished = threading.Event()

    def load(self, path, **kwargs):
        model = qlite.load(path, **kwargs)
        real = model.generate

        def generate(messages, **kw):
            self.calls.append(([dict(m) for m in messages], kw))
            self.pieces.append([])
            if self.fail:
                raise self.fail
            # a random model rambles to the end of the window: keep replies short and tests fast
            kw = dict(kw, max_new_tokens=min(kw["max_new_tokens"], self.max_new_tokens))
            return Recorded(real(messages, **kw), self, kw.get("cancel"))

        model.generate = generate
        return model


class Recorded:
    def __init__(self, generation, spy, cancel):
        self.generation, self.spy, self.cancel = generation, spy, cancel

    @property
    def stats(self):
        return self.generation.stats

    def __iter__(self):
        try:
            for i, piece in enumerate(self.generation):
                self.spy.pieces[-1].append(piece)
                yield piece
                if self.spy.hold and i == 0:
                    assert self.cancel.wait(10), "the test never pressed Escape"
        finally:
            self.spy.finished.set()


async def wait_for(pilot, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def open_chat(app, pilot) -> ChatScreen:
    await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen)
                   and isinstance(app.focused, ChatInput))
    return app.screen


async def send(pilot, chat: ChatScreen, text: str):
    chat.query_one(ChatInput).text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: chat.reply is None and not chat.lock.locked())
    await pilot.pause()


def boxes(chat):
    return [(b.role, b.text) for b in chat.query(MessageBox)]


def make_app(model_dir, spy=None, **kwargs):
    return ChatApp(str(model_dir), loader=(spy or Spy()).load, volatile=False, **kwargs)


@sync
async def test_send_a_message_and_see_the_streamed_reply(model_dir, data_home):
    spy = Spy()
    app = ChatApp(str(model_dir), loader=spy.load, seed=0)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await pilot.press(*"hi there")
        await pilot.press("ctrl+j")  # a newline, not a send
        await pilot.press(*"second line")
        assert not spy.calls
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.reply is None and spy.finished.is_set())
        await pilot.pause()
        assert chat.query_one(ChatInput).text == ""
        messages, kwargs = spy.calls[0]
        assert messages == [{"role": "user", "content": "hi there\nsecond line"}]
        assert kwargs["seed"] == 0  # fixed extras from main(**options) reach generate
        reply = "".join(spy.pieces[0])
        assert len(spy.pieces[0]) > 1 and reply  # it streamed, piece by piece
        assert boxes(chat) == [("user", "hi there\nsecond line"), ("assistant", reply)]
        # saved as each message completed
        history = History(data_home / "qlite" / "history.db")
        [conv] = history.conversations()
        assert conv.title == "hi there"
        saved = history.messages(conv.id)
        assert [(m.role, m.content) for m in saved] == boxes(chat)
        assert saved[1].meta["finish_reason"] in ("stop", "length")
        status = str(chat.query_one("#status").render())
        assert "tiny-qwen2 · fp32" in status and "context " in status and "/256" in status
        assert "decode" in status and "tok/s" in status  # volatile figures shown by default


@sync
async def test_a_long_prompt_shows_how_much_is_read_before_the_reply(model_dir, data_home,
                                                                      monkeypatch):
    """A prompt longer than one prefill chunk: the reply's header says how much of it the
    model has read, then the reply replaces the note."""
    import qlite.model
    monkeypatch.setattr(qlite.model, "PREFILL_CHUNK", 8)  # the tiny model's prompts are short
    notes = []
    real = MessageBox.set_note
    monkeypatch.setattr(MessageBox, "set_note", lambda box, note: (notes.append(note),
                                                                   real(box, note)))
    app = make_app(model_dir)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await send(pilot, chat, "count the words in this long sentence one by one please")
    shown = [n for n in notes if n.startswith("reading the prompt")]
    assert shown and shown[-1] == "reading the prompt 100%", notes
    assert notes.index(shown[-1]) < notes.index(""), notes  # cleared by the first piece


@sync
async def test_escape_stops_at_once_and_keeps_the_partial_reply(model_dir, data_home):
    spy = Spy(hold=True)
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        chat.query_one(ChatInput).text = "tell me a long story"
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.reply is not None and chat.reply.text)
        shown = chat.reply.text
        box = chat.reply.box
        # Enter while a reply is coming refuses to send, and gives the text back
        await pilot.press(*"wait", "enter")
        assert chat.query_one(ChatInput).text == "wait" and len(spy.calls) == 1
        await pilot.press("escape")
        assert chat.reply is None  # the reply ended on screen before the thread noticed
        await wait_for(pilot, lambda: spy.finished.is_set() and not chat.lock.locked())
        await pilot.pause()
        assert box.text == shown  # nothing arrived after Escape
        assert "stopped" in str(box.query_one(".role").render())
        conv = chat.conversation_id
        [user, assistant] = chat.history.messages(conv)
        assert (assistant.content, assistant.meta) == (shown, {"finish_reason": "cancelled"})
        assert chat.last_stats.finish_reason == "cancelled"  # the thread did stop
        # the app is usable again: the next message gets a reply
        spy.hold = False
        await send(pilot, chat, "again")
        assert spy.calls[-1][0][-1] == {"role": "user", "content": "again"}
        assert [m.role for m in chat.history.messages(conv)] == [
            "user", "assistant", "user", "assistant"]


class Gated:
    """A loader whose model's replies are paragraphs released one at a time by the test."""

    def __init__(self):
        self.release = threading.Semaphore(0)

    def load(self, path, **kwargs):
        model = qlite.load(path, **kwargs)
        model.generate = lambda messages, cancel=None, **kw: GatedReply(self.release, cancel)
        return model


class GatedReply:
    def __init__(self, release, cancel):
        self.release, self.cancel = release, cancel
        self.stats = qlite.GenerationStats(finish_reason="stop")

    def __iter__(self):
        for i in range(100):
            if not self.release.acquire(timeout=10) or self.cancel.is_set():
                self.stats.finish_reason = "cancelled"
                return
            yield f"paragraph {i}\n\n"


@sync
async def test_the_view_follows_the_stream_unless_scrolled_up(model_dir, data_home):
    gated = Gated()
    app = ChatApp(str(model_dir), loader=gated.load, volatile=False)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        view = chat.messages_view
        chat.query_one(ChatInput).text = "go"
        await pilot.press("enter")

        async def stream(n):
            before = chat.reply.text.count("paragraph")
            for _ in range(n):
                gated.release.release()
            await wait_for(pilot, lambda: chat.reply.text.count("paragraph") == before + n)
            await pilot.pause(0.1)

        await stream(30)  # more than a screenful
        assert view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y
        view.focus()
        await pilot.press("pageup")  # the user scrolls up to read
        last = None
        while view.scroll_y != last:  # the scroll is animated: a loaded machine takes longer
            last = view.scroll_y
            await pilot.pause(0.1)
        where = view.scroll_y
        assert where < view.max_scroll_y
        await stream(10)
        assert view.scroll_y == where and view.scroll_y < view.max_scroll_y  # left alone
        await pilot.press("end")  # back to the bottom: following again
        await stream(10)
        await pilot.pause(0.1)
        assert view.scroll_y == view.max_scroll_y
        await pilot.press("escape")
        gated.release.release()


@sync
async def test_resume_a_saved_conversation_after_reopening(model_dir, data_home):
    app = make_app(model_dir)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await send(pilot, chat, "remember the number 42")
        first = boxes(chat)
    spy = Spy()
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        assert boxes(chat) == []  # it opens on a new chat; the old one waits in the list
        sidebar = chat.query_one(ConversationList)
        assert len(sidebar.children) == 1
        sidebar.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: boxes(chat) == first)
        assert isinstance(app.focused, ChatInput)
        await send(pilot, chat, "what was it?")
        messages, _ = spy.calls[0]
        assert messages[:2] == [{"role": role, "content": text} for role, text in first]
        assert messages[2] == {"role": "user", "content": "what was it?"}
        assert len(chat.history.conversations()) == 1


@sync
async def test_settings_change_what_generate_receives(model_dir, data_home):
    spy = Spy()
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        dialog = app.screen
        dialog.query_one("#system").text = "You are terse."
        dialog.query_one("#temperature").value = "0.2"
        dialog.query_one("#top_p").value = "0.5"
        dialog.query_one("#max_tokens").value = "7"
        await pilot.click("#save")
        await wait_for(pilot, lambda: app.screen is chat)
        await send(pilot, chat, "hello")
        messages, kwargs = spy.calls[-1]
        assert messages == [{"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "hello"}]
        assert (kwargs["temperature"], kwargs["top_p"], kwargs["max_new_tokens"]) == (0.2, 0.5, 7)
        assert spy.calls[-1][1]["cancel"] is not None
        # saved with the conversation
        conv = chat.history.get(chat.conversation_id)
        assert conv.system == "You are terse."
        assert conv.settings == {"temperature": 0.2, "top_p": 0.5, "max_tokens": 7}
        # slash commands change them too
        for command in ("/temp 1.3", "/system Speak like a pirate."):
            chat.query_one(ChatInput).text = command
            await pilot.press("enter")
        await send(pilot, chat, "ahoy")
        messages, kwargs = spy.calls[-1]
        assert kwargs["temperature"] == 1.3 and kwargs["max_new_tokens"] == 7
        assert messages[0] == {"role": "system", "content": "Speak like a pirate."}
        # a bad value is refused in the dialog, nothing changes
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#top_p").value = "3"
        await pilot.click("#save")
        assert "top-p" in str(app.screen.query_one("#settings-error").render())
        await pilot.press("escape")
        assert chat.history.get(chat.conversation_id).settings["top_p"] == 0.5
    # and a new chat starts from the defaults again, while the old one keeps its own
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        assert chat.settings.temperature == 0.7 and chat.settings.system == ""
        [conv] = chat.history.conversations()
        await chat.show_conversation(conv.id)
        assert chat.settings.temperature == 1.3 and chat.settings.system == "Speak like a pirate."


@sync
async def test_regenerate_edit_and_resend_clear_and_new(model_dir, data_home):
    spy = Spy()
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await send(pilot, chat, "first question")
        conv = chat.conversation_id
        old_reply = chat.history.messages(conv)[1].id
        # regenerate: the same prompt goes again, the old reply is replaced
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(spy.calls) == 2 and chat.reply is None
                       and not chat.lock.locked())
        assert spy.calls[1][0] == spy.calls[0][0]
        saved = chat.history.messages(conv)
        assert [m.role for m in saved] == ["user", "assistant"] and saved[1].id != old_reply
        assert [b.role for b in chat.query(MessageBox)] == ["user", "assistant"]
        # edit and resend: Up in the empty box fetches the last message back
        await pilot.press("up")
        box = chat.query_one(ChatInput)
        assert box.text == "first question"
        box.text = "better question"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(spy.calls) == 3 and chat.reply is None
                       and not chat.lock.locked())
        assert spy.calls[2][0] == [{"role": "user", "content": "better question"}]
        assert [m.content for m in chat.history.messages(conv)][0] == "better question"
        assert len(chat.history.messages(conv)) == 2
        # copy the last reply
        await pilot.press("ctrl+o")
        assert app.clipboard == chat.history.messages(conv)[1].content
        # /clear empties this conversation, /new starts another
        box.text = "/clear"
        await pilot.press("enter")
        await pilot.pause()
        assert chat.history.messages(conv) == [] and boxes(chat) == []
        box.text = "/new Ideas"
        await pilot.press("enter")
        await pilot.pause()
        assert chat.conversation_id != conv
        assert [c.title for c in chat.history.conversations()][0] == "Ideas"


@sync
async def test_context_limit_notice_keeps_history(model_dir, data_home):
    history = History(data_home / "qlite" / "history.db")
    conv = history.create("long")
    for i in range(6):
        history.add(conv.id, "user", f"question {i} " + "about the weather " * 4)
        history.add(conv.id, "assistant", f"answer {i} " + "it will rain tomorrow " * 4)
    spy = Spy()
    app = make_app(model_dir, spy, context=160)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await chat.show_conversation(conv.id)
        notice = chat.query_one("#notice")
        assert not notice.has_class("-shown")
        await send(pilot, chat, "and the day after?")
        assert notice.has_class("-shown")
        assert "oldest" in str(notice.render()) and "still in the history" in str(notice.render())
        assert len(chat.history.messages(conv.id)) == 14  # nothing deleted
        assert len(spy.calls[0][0]) == 13  # all of it was offered; generate left some out


@sync
async def test_search_rename_export_delete(model_dir, data_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = History(data_home / "qlite" / "history.db")
    a = history.create("Cooking")
    history.add(a.id, "user", "How long do I boil an egg?")
    b = history.create("Python help")
    history.add(b.id, "user", "What is a generator?")
    app = make_app(model_dir)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await pilot.press("ctrl+f")
        await wait_for(pilot, lambda: isinstance(app.screen, SearchScreen))
        await pilot.press(*"egg")
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.conversation_id == a.id and app.screen is chat)
        assert boxes(chat) == [("user", "How long do I boil an egg?")]

        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("Input").value = "Eggs"
        await pilot.press("enter")
        await pilot.pause()
        assert history.get(a.id).title == "Eggs"
        assert "Eggs" in [str(i.query_one("Label").render())
                          for i in chat.query_one(ConversationList).children]

        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        assert app.screen.query_one("Input").value == str(tmp_path / "eggs.md")
        await pilot.press("enter")
        await pilot.pause()
        assert (tmp_path / "eggs.md").read_text() == history.export_markdown(a.id)

        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        assert len(history.conversations()) == 2
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await pilot.pause()
        assert [c.id for c in history.conversations()] == [b.id]
        assert chat.conversation_id is None and boxes(chat) == []


@sync
async def test_errors_are_shown_in_the_app(model_dir, data_home):
    def broken(path, **kwargs):
        raise QliteError(f"{path}: no such model directory")

    app = ChatApp("/nowhere", loader=broken)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.screen.query_one("#load-error").has_class("-shown"))
        assert "/nowhere: no such model directory" in str(app.screen.query_one("#load-error").render())
        await pilot.press("q")
    assert app.return_code == 0

    spy = Spy(fail=RuntimeError("CUDA out of memory"))
    app = make_app(model_dir, spy)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        await send(pilot, chat, "hi")
        box = list(chat.query(MessageBox))[-1]
        assert "RuntimeError: CUDA out of memory" in str(box.query_one(".error").render())
        assert "failed" in str(box.query_one(".role").render())
        spy.fail = None  # the app still works: regenerate the reply
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(spy.calls) == 2 and chat.reply is None
                       and not chat.lock.locked())
        assert [m.role for m in chat.history.messages(chat.conversation_id)] == [
            "user", "assistant"]


@sync
async def test_loading_shows_progress_then_opens_the_chat(model_dir, data_home):
    seen = []
    gate = threading.Event()

    def loader(path, progress=None, **kwargs):
        def spy(stage, done, total):
            seen.append((stage, done, total))
            progress(stage, done, total)
        progress("download", 0, 10)
        gate.wait(10)
        return qlite.load(path, progress=spy, **kwargs)

    app = ChatApp(str(model_dir), loader=loader, volatile=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "download" in str(app.screen.query_one("#stage").render()))
        assert isinstance(app.screen, LoadingScreen)
        gate.set()
        await open_chat(app, pilot)
        assert seen and seen[-1][0] == "loading weights" and seen[-1][1] == seen[-1][2]


# Snapshots: a fixed terminal, fixed data, volatile figures hidden.

def seeded_history(data_home):
    history = History(data_home / "qlite" / "history.db")
    old = history.create("Packing list for a hike")
    history.add(old.id, "user", "What should I pack?")
    conv = history.create("Reverse a string in Python", system="You are a concise assistant.")
    history.add(conv.id, "user", "How do I reverse a string in Python?")
    history.add(conv.id, "assistant",
                "Use a **slice** with a step of -1:\n\n```python\ntext = \"hello\"\n"
                "print(text[::-1])  # olleh\n```\n\nIt works for lists and tuples too.",
                {"finish_reason": "stop"})
    return conv.id


def chat_app(model_dir, **kwargs):
    return ChatApp(str(model_dir), volatile=False, **kwargs)


async def until_chat(pilot):
    await open_chat(pilot.app, pilot)


def test_snapshot_chat(model_dir, data_home, snap_compare):
    conv = seeded_history(data_home)

    async def run_before(pilot):
        await open_chat(pilot.app, pilot)
        await pilot.app.screen.show_conversation(conv)
        await pilot.pause()

    assert snap_compare(chat_app(model_dir), terminal_size=SIZE, run_before=run_before)


def test_snapshot_new_chat(model_dir, data_home, snap_compare):
    seeded_history(data_home)
    assert snap_compare(chat_app(model_dir), terminal_size=SIZE, run_before=until_chat)


def until_screen(key, screen):
    """run_before for a snapshot: open the chat, press key, wait for that screen."""
    async def run_before(pilot):
        await open_chat(pilot.app, pilot)
        await pilot.press(key)
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen))
    return run_before


def test_snapshot_settings(model_dir, data_home, snap_compare):
    assert snap_compare(chat_app(model_dir), terminal_size=SIZE,
                        run_before=until_screen("ctrl+s", SettingsScreen))


def test_snapshot_help(model_dir, data_home, snap_compare):
    history = History(data_home / "qlite" / "history.db")
    history.path = "~/.local/share/qlite/history.db"  # shown in the help text
    assert snap_compare(chat_app(model_dir, history=history), terminal_size=SIZE,
                        run_before=until_screen("f1", HelpScreen))


def test_snapshot_loading(data_home, snap_compare, tmp_path, monkeypatch):
    """First run: no demo model cached yet, so the app downloads it, with progress."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def loader(path, progress=None, **kwargs):
        progress("download", 3, 10)
        app.closing.wait(30)  # until the snapshot is taken and the app closes
        raise QliteError("closed")

    async def run_before(pilot):
        await wait_for(pilot, lambda: "download" in str(app.screen.query_one("#stage").render()))

    app = ChatApp("demo", loader=loader, volatile=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_snapshot_load_error(data_home, snap_compare):
    def loader(path, progress=None, **kwargs):
        raise QliteError("/models/qwen: tensor 'lm_head.weight' is missing from the checkpoint")

    async def run_before(pilot):
        await wait_for(pilot, lambda: pilot.app.screen.query_one("#load-error").has_class("-shown"))

    assert snap_compare(ChatApp("/models/qwen", loader=loader, volatile=False),
                        terminal_size=SIZE, run_before=run_before)


def test_status_reads_quantization_and_offloading_defensively():
    from types import SimpleNamespace
    from qlite.tui import expert_hit_rate, weights_label

    quantized = SimpleNamespace(config=SimpleNamespace(
        quantization={"format": "int4", "group_size": 128}))
    assert weights_label(quantized) == "int4 g128"
    assert weights_label(SimpleNamespace(config=SimpleNamespace(
        quantization={"bits": 8}))) == "int8"
    assert expert_hit_rate(quantized) is None  # no offloading: nothing shown
    assert expert_hit_rate(SimpleNamespace(offload_stats=lambda: {"hits": 9, "misses": 1})) == 0.9
    assert expert_hit_rate(SimpleNamespace(offload_stats=lambda: {"hit_rate": 0.5})) == 0.5
    assert expert_hit_rate(SimpleNamespace(offload_stats=lambda: {"hits": 0, "misses": 0})) is None
    assert expert_hit_rate(SimpleNamespace(offload_stats=lambda: None)) is None

    def broken():
        raise RuntimeError("not yet")
    assert expert_hit_rate(SimpleNamespace(offload_stats=broken)) is None


@sync
async def test_status_bar_shows_the_expert_cache_hit_rate(model_dir, data_home):
    def loader(path, **kwargs):
        model = qlite.load(path, **kwargs)
        model.offload_stats = lambda: {"hits": 45, "misses": 5}
        return model

    app = ChatApp(str(model_dir), loader=loader)
    async with app.run_test(size=SIZE) as pilot:
        chat = await open_chat(app, pilot)
        status = str(chat.query_one("#status").render())
        assert "expert cache 90% hits" in status and "RAM" in status
