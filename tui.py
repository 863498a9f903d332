"""`qlite chat`: the terminal chat, a Textual app.

Two screens: LoadingScreen shows real progress while the model loads (or the demo model is
pulled on first run), then ChatScreen. Replies are generated in a daemon thread that posts each
text piece back to the screen as a message, so the UI never waits on the model; Escape sets the
generation's cancel event and ends the reply on screen at once, keeping what was shown.

Conversations live in qlite.history (SQLite); this file only draws them. It uses qlite's public
API: qlite.load, model.generate, qlite.QliteError, qlite.history.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, Footer, Input, Label, ListItem, ListView, Markdown,
                             OptionList, ProgressBar, Static, TextArea)
from textual.widgets.option_list import Option

import qlite
from qlite.errors import QliteError
from qlite.generate import sampling_params
from qlite.history import DEFAULT_SETTINGS, History, title_from

KEYS = [
    ("Enter", "send the message"),
    ("Ctrl+J / Shift+Enter", "new line in the message"),
    ("Escape", "stop the reply now (its text is kept); cancel an edit"),
    ("Ctrl+N", "new conversation"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+E, Up (empty box)", "edit and resend your last message"),
    ("Ctrl+O", "copy the last reply to the clipboard"),
    ("Ctrl+S", "settings: system prompt, temperature, top-p, max tokens"),
    ("Ctrl+F", "search all conversations"),
    ("Ctrl+B", "show or hide the conversation list"),
    ("F2 / F8", "rename / delete the conversation"),
    ("F3", "export the conversation as Markdown"),
    ("Tab", "move between the list and the message box"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]
COMMANDS = [
    ("/new [title]", "start a new conversation"),
    ("/system [text]", "set the system prompt (no text: open the settings)"),
    ("/temp [value]", "set the temperature (no value: show it)"),
    ("/clear", "delete the messages of this conversation"),
    ("/help", "this help"),
]


def help_text(db_path) -> str:
    def rows(pairs):
        return "\n".join(f"  {k:<24}{v}" for k, v in pairs)
    return (f"Keys\n{rows(KEYS)}\n\nCommands (type them in the message box)\n{rows(COMMANDS)}"
            f"\n\nConversations are saved in {db_path}\nas each message completes. When one "
            "outgrows the context window, its oldest turns\nare left out of the prompt (a notice "
            "says so); nothing is deleted from the history.")


# ---------------------------------------------------------------------------------------------
# Small helpers that read the model defensively: later issues add quantization and offloading.

def model_name(model) -> str:
    model_dir = getattr(model, "model_dir", None)
    return Path(model_dir).name if model_dir else "model"


def weights_label(model) -> str:
    """'int4 g128' for a quantized checkpoint, else the dtype of the weights ('bf16')."""
    q = getattr(getattr(model, "config", None), "quantization", None)
    if isinstance(q, dict) and q:
        name = q.get("format") or q.get("method") or q.get("quant_method")
        bits = q.get("bits")
        label = str(name) if name else (f"int{bits}" if bits else "quantized")
        if bits and str(bits) not in label:
            label += f" {bits}-bit"
        group = q.get("group_size")
        return label + (f" g{group}" if group else "")
    try:
        dtype = next(model.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return "?"
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16",
            "torch.float16": "fp16"}.get(str(dtype), str(dtype).replace("torch.", ""))


def model_device(model) -> str:
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def cpu_memory() -> int | None:
    """Resident set size of this process in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def gpu_memory(model) -> int | None:
    """Bytes the CUDA caching allocator holds on the model's GPU; None for a CPU model."""
    device = model_device(model)
    if not device.startswith("cuda"):
        return None
    import torch  # already imported by qlite; only asked when the model is on a GPU
    return torch.cuda.memory_reserved(device)


def expert_hit_rate(model) -> float | None:
    """The expert cache's hit rate when the model offloads MoE experts, else None."""
    stats_of = getattr(model, "offload_stats", None)
    if not callable(stats_of):
        return None
    try:
        stats = stats_of()
    except Exception:  # a statistics hiccup must never break the chat
        return None
    if not isinstance(stats, dict):
        return None
    if isinstance(stats.get("hit_rate"), (int, float)):
        return float(stats["hit_rate"])
    hits, misses = stats.get("hits"), stats.get("misses")
    if isinstance(hits, int) and isinstance(misses, int) and hits + misses:
        return hits / (hits + misses)
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe_progress(stage: str, done: int, total: int) -> str:
    if total > 2**20:
        return f"{stage}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB"
    if total:
        return f"{stage}: {done} / {total}"
    return stage


# ---------------------------------------------------------------------------------------------
# Loading

class LoadingScreen(Screen):
    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def __init__(self, heading: str):
        super().__init__()
        self.heading = heading

    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Static("qlite", id="logo")
            yield Static(self.heading, id="loading-what")
            yield Static("starting", id="stage")
            yield ProgressBar(id="load-bar", show_eta=False)
            yield Static("", id="load-error")
        yield Footer()

    def show_progress(self, stage: str, done: int, total: int):
        self.query_one("#stage", Static).update(describe_progress(stage, done, total))
        self.query_one("#load-bar", ProgressBar).update(total=max(total, 1), progress=done)

    def show_error(self, message: str):
        self.query_one("#stage", Static).update("Could not load the model")
        self.query_one("#load-bar", ProgressBar).display = False
        error = self.query_one("#load-error", Static)
        error.update(f"{message}\n\nPress q to quit.")
        error.add_class("-shown")


# ---------------------------------------------------------------------------------------------
# Dialogs

class PromptScreen(ModalScreen[str | None]):
    """One line of text: rename a conversation, choose where to export it."""
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = ""):
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, id="prompt-input")
            yield Label("Enter accepts · Escape cancels", classes="hint")

    @on(Input.Submitted)
    def accept(self, event: Input.Submitted):
        self.dismiss(event.value.strip() or None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    @on(Button.Pressed)
    def answer(self, event: Button.Pressed):
        self.dismiss(event.button.id == "yes")


@dataclass
class Settings:
    system: str = ""
    temperature: float = DEFAULT_SETTINGS["temperature"]
    top_p: float = DEFAULT_SETTINGS["top_p"]
    max_tokens: int = DEFAULT_SETTINGS["max_tokens"]

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens}

    def check(self, max_context: int | None = None):
        """Raise ValueError, naming the field as the dialog does, for a value generate would
        refuse (qlite's SamplingParams decides) or a reply longer than the context window."""
        labels = {"temperature": "temperature", "top_p": "top-p", "max_new_tokens": "max tokens"}
        try:
            qlite.SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                 max_new_tokens=self.max_tokens)
        except QliteError as e:  # "top_p 0.0: ..." -> "top-p 0.0: ..."
            name, _, rest = str(e).partition(" ")
            raise ValueError(f"{labels.get(name, name)} {rest}") from None
        if max_context is not None and self.max_tokens > max_context:
            raise ValueError(f"max tokens {self.max_tokens}: the context window is "
                             f"{max_context} tokens")


class SettingsScreen(ModalScreen[Settings | None]):
    """System prompt and sampling settings of the current conversation."""
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, settings: Settings, max_context: int):
        super().__init__()
        self.settings, self.max_context = settings, max_context

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog", id="settings"):
            yield Label("Settings of this conversation", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(s.system, id="system")
            with Horizontal(classes="fields"):
                with Vertical():
                    yield Label("Temperature")
                    yield Input(str(s.temperature), id="temperature", type="number")
                with Vertical():
                    yield Label("Top-p")
                    yield Input(str(s.top_p), id="top_p", type="number")
                with Vertical():
                    yield Label("Max new tokens")
                    yield Input(str(s.max_tokens), id="max_tokens", type="integer")
            yield Label("Temperature 0 is greedy; top-p 1 is off. Saved with this conversation.",
                        classes="hint")
            yield Label("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    @on(Button.Pressed, "#cancel")
    def cancel(self):
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self):
        try:
            settings = Settings(
                system=self.query_one("#system", TextArea).text.strip(),
                temperature=parse_number(self.query_one("#temperature", Input).value,
                                         "temperature"),
                top_p=parse_number(self.query_one("#top_p", Input).value, "top-p"),
                max_tokens=parse_number(self.query_one("#max_tokens", Input).value,
                                        "max tokens", integer=True))
            settings.check(self.max_context)
        except ValueError as e:
            self.query_one("#settings-error", Label).update(str(e))
            return
        self.dismiss(settings)


def parse_number(text: str, name: str, integer: bool = False):
    """A number typed into the settings; its range is SamplingParams' to check."""
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a{'n integer' if integer else ' number'}")


class SearchScreen(ModalScreen[int | None]):
    """Search every saved conversation; Enter opens the chosen one."""
    BINDINGS = [Binding("escape", "dismiss(None)", "Close"),
                Binding("down", "to_results", "Results", show=False)]

    def __init__(self, history: History):
        super().__init__()
        self.history = history

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="search"):
            yield Label("Search conversations", classes="dialog-title")
            yield Input(placeholder="words to find", id="query")
            yield OptionList(id="results")
            yield Label("Enter opens · ↓ to the results · Escape closes", classes="hint")

    @on(Input.Changed)
    def find(self, event: Input.Changed):
        results = self.query_one("#results", OptionList)
        results.clear_options()
        for conv, snippet in self.history.search(event.value):
            results.add_option(Option(f"{conv.title}\n  {snippet}", id=str(conv.id)))
        if results.option_count:
            results.highlighted = 0

    @on(Input.Submitted)
    def open_first(self):
        results = self.query_one("#results", OptionList)
        if results.highlighted is not None:
            self.dismiss(int(results.get_option_at_index(results.highlighted).id))

    @on(OptionList.OptionSelected)
    def open_selected(self, event: OptionList.OptionSelected):
        self.dismiss(int(event.option.id))

    def action_to_results(self):
        self.query_one("#results", OptionList).focus()


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close")]

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="help"):
            yield Label("qlite chat", classes="dialog-title")
            yield Static(self.text, markup=False)
            yield Label("Escape closes", classes="hint")


# ---------------------------------------------------------------------------------------------
# The chat

class ChatInput(TextArea):
    """The message box: Enter sends; Ctrl+J (or Shift+Enter where the terminal reports it)
    makes a new line."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class EditLast(Message):
        pass

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            # Empty the box now, not when the message is handled: keys typed in between
            # belong to the next message.
            text = self.text
            self.clear()
            self.post_message(self.Submitted(text))
            return
        if event.key in ("ctrl+j", "shift+enter", "newline"):
            event.stop()
            event.prevent_default()
            self.replace("\n", *self.selection)
            return
        if event.key == "up" and not self.text:
            # the habit of other chat apps: Up in an empty box edits your last message
            event.stop()
            event.prevent_default()
            self.post_message(self.EditLast())
            return
        await super()._on_key(event)


class ConversationList(ListView):
    """The sidebar list. Focusing it highlights a conversation, so Enter opens one at once."""

    def on_focus(self):
        if self.index is None and self.children:
            self.index = 0


def reply_parser() -> MarkdownIt:
    """Markdown as chat models write it: a line break is a line break, not the space of a
    CommonMark soft break that would run "1\n2\n3" into "1 2 3" (code blocks and lists are
    untouched: their lines are not soft breaks)."""
    def hard_breaks(state):
        for token in state.tokens:
            for child in token.children or ():
                if child.type == "softbreak":
                    child.type = "hardbreak"

    md = MarkdownIt("gfm-like")
    md.core.ruler.push("hard_breaks", hard_breaks)
    return md


class MessageBox(Vertical):
    """One message: who said it, then the text. Replies are Markdown; your own messages are
    shown as typed (line breaks and pasted code kept), as most chat apps do."""

    def __init__(self, role: str, content: str = "", message_id: int | None = None,
                 label: str | None = None, note: str = ""):
        super().__init__(classes=role)
        self.role, self.content, self.message_id = role, content, message_id
        self.label_text = label or ("You" if role == "user" else "Assistant")
        self.note = note

    def compose(self) -> ComposeResult:
        yield Static(self.header(), classes="role")
        if self.role == "user":
            yield Static(self.content, classes="text", markup=False)
        else:
            yield Markdown(self.content, parser_factory=reply_parser)

    @property
    def text(self) -> str:
        """The text on screen (a streaming reply's grows in its Markdown widget)."""
        return self.content if self.role == "user" else self.query_one(Markdown).source

    def header(self) -> str:
        return self.label_text + (f" · {self.note}" if self.note else "")

    def set_note(self, note: str):
        self.note = note
        self.query_one(".role", Static).update(self.header())

    def show_error(self, text: str):
        self.mount(Static(text, classes="error", markup=False))


# What a reply's header says about how it ended ("streaming": the app died while it was written)
FINISH_NOTES = {"cancelled": "stopped", "length": "stopped at max tokens", "error": "failed",
                "streaming": "interrupted"}


@dataclass
class Reply:
    """The reply being generated: which run it is, where it shows, what has arrived."""
    run: int
    conversation_id: int
    cancel: threading.Event
    box: MessageBox
    stream: object  # textual MarkdownStream
    text: str = ""
    message_id: int | None = None
    saved_at: float = field(default_factory=time.monotonic)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+n", "new_chat", "New", priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("ctrl+e", "edit_last", "Edit last", show=False, priority=True),
        Binding("ctrl+o", "copy_reply", "Copy reply", priority=True),
        Binding("ctrl+s", "settings", "Settings", priority=True),
        Binding("ctrl+f", "search", "Search", priority=True),
        Binding("ctrl+b", "toggle_sidebar", "List", show=False, priority=True),
        Binding("f2", "rename", "Rename", show=False),
        Binding("f3", "export", "Export", show=False),
        Binding("f8", "delete", "Delete", show=False),
        Binding("f1", "help", "Help"),
    ]
    # seconds between saves of a reply still streaming (so a kill loses at most this much)
    SAVE_EVERY = 1.0

    class Piece(Message):
        def __init__(self, run: int, text: str):
            super().__init__()
            self.run, self.text = run, text

    class Progress(Message):
        """Work before the first piece: a long prompt being read, the decode step compiling."""
        def __init__(self, run: int, stage: str, done: int, total: int):
            super().__init__()
            self.run, self.stage, self.done, self.total = run, stage, done, total

    class Done(Message):
        def __init__(self, run: int, stats, error: str | None):
            super().__init__()
            self.run, self.stats, self.error = run, stats, error

    def __init__(self, model, history: History, volatile: bool = True,
                 sampling: dict | None = None):
        super().__init__()
        self.model, self.history, self.volatile = model, history, volatile
        self.extra_sampling = dict(sampling or {})  # top_k, repetition_penalty, seed from main()
        self.conversation_id: int | None = None  # None: a new chat, saved on its first message
        self.settings = Settings()
        self.reply: Reply | None = None
        self.runs = 0
        self.run_conversations: dict[int, int] = {}  # run -> its conversation, until it is done
        self.lock = threading.Lock()  # one generation at a time on the model's KV cache
        self.editing: int | None = None  # id of the message being edited, if any
        self.last_stats = None
        self.context_tokens = 0
        self.thread: threading.Thread | None = None  # the latest generation thread

    # layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Static("Conversations", id="sidebar-title")
                yield ConversationList(id="conversations")
                yield Static("^N new F2 rename F8 delete", id="sidebar-hint")
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield Static("", id="notice")
                box = ChatInput(id="input", soft_wrap=True, show_line_numbers=False,
                                compact=True, placeholder="Message (Enter sends, Ctrl+J new line,"
                                " F1 help)")
                box.cursor_blink = self.volatile  # a blinking cursor makes snapshots flaky
                yield box
        yield Static("", id="status")
        yield Footer()

    async def on_mount(self):
        self.query_one("#messages", VerticalScroll).anchor()
        await self.refresh_sidebar()
        await self.show_conversation(None)
        self.query_one("#input", ChatInput).focus()
        if self.volatile:  # memory moves while idle too (other processes, the allocator)
            self.set_interval(2.0, self.update_status)

    @property
    def messages_view(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    async def refresh_sidebar(self):
        view = self.query_one("#conversations", ListView)
        await view.clear()
        index = None
        items = []
        for i, conv in enumerate(self.history.conversations()):
            item = ListItem(Label(conv.title, markup=False))
            item.conversation_id = conv.id
            items.append(item)
            if conv.id == self.conversation_id:
                index = i
        await view.extend(items)
        view.index = index

    async def show_conversation(self, conversation_id: int | None):
        """Show a saved conversation (None: a fresh one), with its own settings."""
        self.conversation_id = conversation_id
        self.editing = None
        view = self.messages_view
        await view.remove_children()
        if conversation_id is None:
            self.settings = Settings(**DEFAULT_SETTINGS)
            messages = []
        else:
            conv = self.history.get(conversation_id)
            self.settings = Settings(system=conv.system, **{
                k: conv.settings[k] for k in ("temperature", "top_p", "max_tokens")})
            messages = self.history.messages(conversation_id)
        widgets = []
        if self.settings.system:
            widgets.append(Static(f"System: {self.settings.system}", id="system-line",
                                  markup=False))
        if not messages:
            widgets.append(Static(f"Say something to {model_name(self.model)}. Enter sends, "
                                  "Ctrl+J makes a new line, F1 lists the keys.", id="welcome"))
        for m in messages:
            note = FINISH_NOTES.get(m.meta.get("finish_reason", ""), "")
            widgets.append(MessageBox(m.role, m.content, m.id, note=note))
        await view.mount_all(widgets)
        view.anchor()
        self.set_notice("")
        self.last_stats = None
        self.context_tokens = self.count_tokens(self.chat_messages()) if messages else 0
        self.update_status()
        list_view = self.query_one("#conversations", ListView)
        for i, item in enumerate(list_view.children):
            if getattr(item, "conversation_id", None) == conversation_id:
                list_view.index = i
                break
        else:
            list_view.index = None

    def chat_messages(self) -> list[dict]:
        """What goes to model.generate: the system prompt, then the saved turns."""
        turns = [m.as_chat() for m in self.history.messages(self.conversation_id)]
        if self.settings.system:
            turns.insert(0, {"role": "system", "content": self.settings.system})
        return turns

    def count_tokens(self, messages: list[dict]) -> int:
        if not messages or getattr(self.model, "tokenizer", None) is None:
            return 0
        tok = self.model.tokenizer
        try:
            return len(tok.encode_chat(messages, add_generation_prompt=False))
        except QliteError:
            return 0

    def set_notice(self, text: str):
        notice = self.query_one("#notice", Static)
        notice.update(text)
        notice.set_class(bool(text), "-shown")

    def update_status(self):
        model = self.model
        window = getattr(model, "max_context", 0)
        parts = [f"{model_name(model)} · {weights_label(model)}",
                 f"context {self.context_tokens:,}/{window:,}"]
        if self.volatile:
            stats = self.last_stats
            if stats is not None:
                parts.append(f"prefill {stats.prefill_tokens_per_s:,.0f} · "
                             f"decode {stats.decode_rate}")
            memory = []
            gpu = gpu_memory(model)
            if gpu is not None:
                memory.append(f"GPU {gib(gpu)}")
            cpu = cpu_memory()
            if cpu is not None:
                memory.append(f"RAM {gib(cpu)}")
            if memory:
                parts.append(" · ".join(memory))
            hit = expert_hit_rate(model)
            if hit is not None:
                parts.append(f"expert cache {hit:.0%} hits")
        if self.reply is not None:
            parts.append("replying (Esc stops)")
        self.query_one("#status", Static).update(" │ ".join(parts))

    # sending
    @on(ChatInput.Submitted)
    async def submitted(self, event: ChatInput.Submitted):
        text = event.text.strip()
        if not text:
            return
        if text.startswith("/"):
            await self.command(text)
            return
        if self.reply is not None:
            self.notify("Still replying: Escape stops it.", severity="warning")
            box = self.query_one("#input", ChatInput)
            box.text = event.text + box.text  # give the message back, nothing lost
            box.move_cursor(box.document.end)
            return
        await self.send(text)

    async def send(self, text: str):
        if self.conversation_id is None:
            conv = self.history.create(title_from(text), self.settings.system,
                                       self.settings.sampling())
            self.conversation_id = conv.id
            await self.refresh_sidebar()
        if self.editing is not None:
            self.history.delete_from(self.conversation_id, self.editing)
            self.editing = None
            await self.show_conversation(self.conversation_id)
        message_id = self.history.add(self.conversation_id, "user", text)
        for welcome in self.query("#welcome"):
            await welcome.remove()
        await self.messages_view.mount(MessageBox("user", text, message_id))
        await self.start_reply()

    async def start_reply(self):
        """Generate a reply to the conversation as saved, in a thread."""
        messages = self.chat_messages()
        box = MessageBox("assistant", note="…")
        view = self.messages_view
        await view.mount(box)
        view.anchor()  # follow the new reply, even if the user had scrolled up before
        self.runs += 1
        stream = Markdown.get_stream(box.query_one(Markdown))
        self.reply = Reply(self.runs, self.conversation_id, threading.Event(), box, stream)
        self.run_conversations[self.runs] = self.conversation_id
        kwargs = dict(self.extra_sampling, temperature=self.settings.temperature,
                      top_p=self.settings.top_p, max_new_tokens=self.settings.max_tokens)
        self.thread = threading.Thread(target=self.generate, name="qlite-generate", daemon=True,
                                       args=(self.reply.run, messages, kwargs, self.reply.cancel))
        self.thread.start()
        self.update_status()

    def generate(self, run: int, messages: list[dict], kwargs: dict, cancel: threading.Event):
        """The worker thread: stream pieces back as messages; never raise into the void."""
        def post(message):
            try:
                self.post_message(message)
            except RuntimeError:  # the app has closed its event loop
                cancel.set()

        def progress(stage: str, done: int, total: int):
            post(self.Progress(run, stage, done, total))

        with self.lock:
            try:
                generation = self.model.generate(messages, cancel=cancel, progress=progress,
                                                 **kwargs)
                for piece in generation:
                    post(self.Piece(run, piece))
                post(self.Done(run, generation.stats, None))
            except QliteError as e:
                post(self.Done(run, None, str(e)))
            except Exception as e:  # out of memory and the like: show it, keep the app alive
                post(self.Done(run, None, f"{type(e).__name__}: {e}"))

    @on(Piece)
    async def piece(self, event: Piece):
        reply = self.reply
        if reply is None or event.run != reply.run:
            return  # a reply already stopped: what was on screen is what was kept
        if not reply.text:
            reply.box.set_note("")
        reply.text += event.text
        await reply.stream.write(event.text)
        if self.reply is not reply:
            return  # Escape ended it while the text was drawn; finish() saved it already
        if time.monotonic() - reply.saved_at > self.SAVE_EVERY:
            self.save_reply(reply, {"finish_reason": "streaming"})

    @on(Progress)
    def progress(self, event: Progress):
        reply = self.reply
        if reply is not None and event.run == reply.run and not reply.text:
            stage = "reading the prompt" if event.stage == "prefill" else event.stage
            reply.box.set_note(f"{stage} {event.done / max(event.total, 1):.0%}")

    def save_reply(self, reply: Reply, meta: dict):
        reply.saved_at = time.monotonic()
        if reply.message_id is None:
            reply.message_id = self.history.add(reply.conversation_id, "assistant",
                                                reply.text, meta)
            reply.box.message_id = reply.message_id
        else:
            self.history.update(reply.message_id, reply.text, meta)

    @on(Done)
    async def done(self, event: Done):
        # A stopped reply's thread reports late; its numbers only mean something if its
        # conversation is still the one on screen.
        conversation_id = self.run_conversations.pop(event.run, None)
        if event.stats is not None and conversation_id == self.conversation_id:
            self.show_stats(event.stats)
        if self.reply is not None and event.run == self.reply.run:
            await self.finish(event.stats.finish_reason if event.stats else "error", event.error)

    async def finish(self, reason: str, error: str | None = None):
        """End the current reply on screen and in the history."""
        reply, self.reply = self.reply, None
        await reply.stream.stop()
        meta = {"finish_reason": reason}
        if reply.text or reply.message_id is not None:
            self.save_reply(reply, meta)
        reply.box.set_note(FINISH_NOTES.get(reason, ""))
        if error:
            reply.box.show_error(error)
            self.notify(error, title="Generation failed", severity="error", timeout=8)
        self.update_status()
        await self.refresh_sidebar()  # this conversation is now the most recent

    def show_stats(self, stats):
        self.last_stats = stats
        self.context_tokens = stats.prompt_tokens + stats.generated_tokens
        dropped = stats.dropped_messages
        self.set_notice(
            f"Context window full: the oldest {dropped} message{'s' if dropped != 1 else ''} "
            "were left out of the prompt. They are still in the history." if dropped else "")
        self.update_status()

    # actions
    async def action_stop(self):
        if self.reply is not None:
            self.reply.cancel.set()
            await self.finish("cancelled")
        elif self.editing is not None:
            self.editing = None
            self.query_one("#input", ChatInput).clear()
            self.set_notice("")
        elif self.focused is not self.query_one("#input"):
            self.query_one("#input").focus()

    async def stop_if_replying(self):
        if self.reply is not None:
            await self.action_stop()

    async def action_new_chat(self):
        await self.stop_if_replying()
        await self.show_conversation(None)
        self.query_one("#input").focus()

    async def action_regenerate(self):
        if self.reply is not None or self.conversation_id is None:
            return
        messages = self.history.messages(self.conversation_id)
        if not messages:
            return
        if messages[-1].role == "assistant":
            self.history.delete_from(self.conversation_id, messages[-1].id)
            for box in self.query(MessageBox):
                if box.message_id == messages[-1].id:
                    await box.remove()
        await self.start_reply()

    @on(ChatInput.EditLast)
    async def action_edit_last(self):
        if self.reply is not None or self.conversation_id is None:
            return
        users = [m for m in self.history.messages(self.conversation_id) if m.role == "user"]
        if not users:
            return
        self.editing = users[-1].id
        box = self.query_one("#input", ChatInput)
        box.text = users[-1].content
        box.move_cursor(box.document.end)
        box.focus()
        self.set_notice("Editing your last message: Enter resends it (the reply after it is "
                        "replaced), Escape cancels.")

    def action_copy_reply(self):
        replies = [m for m in self.history.messages(self.conversation_id) if
                   m.role == "assistant"] if self.conversation_id else []
        if not replies:
            self.notify("No reply to copy yet.")
            return
        self.app.copy_to_clipboard(replies[-1].content)
        self.notify(f"Copied the last reply ({len(replies[-1].content)} characters).")

    def action_settings(self):
        async def apply(settings: Settings | None):
            if settings is not None:
                await self.apply_settings(settings)
        window = getattr(self.model, "max_context", 32768)
        self.app.push_screen(SettingsScreen(self.settings, window), apply)

    async def apply_settings(self, settings: Settings):
        system_changed = settings.system != self.settings.system
        self.settings = settings
        if self.conversation_id is not None:
            self.history.set_system(self.conversation_id, settings.system)
            self.history.set_settings(self.conversation_id, settings.sampling())
        if system_changed and self.reply is None:  # redraw the "System:" line
            if self.conversation_id is not None:
                await self.show_conversation(self.conversation_id)
            else:
                await self.show_fresh_with(settings)
        self.notify(f"temperature {settings.temperature}, top-p {settings.top_p}, "
                    f"max tokens {settings.max_tokens}" +
                    (", system prompt set" if settings.system else ""), title="Settings")

    async def show_fresh_with(self, settings: Settings):
        """Redraw an unsaved new chat, keeping the settings chosen for it."""
        await self.show_conversation(None)
        self.settings = settings
        if settings.system:
            await self.messages_view.mount(
                Static(f"System: {settings.system}", id="system-line", markup=False),
                before=0)

    def action_search(self):
        async def open_found(conversation_id: int | None):
            if conversation_id is not None:
                await self.stop_if_replying()
                await self.show_conversation(conversation_id)
        self.app.push_screen(SearchScreen(self.history), open_found)

    def action_toggle_sidebar(self):
        self.query_one("#sidebar").toggle_class("-hidden")

    def target_conversation(self) -> int | None:
        """The conversation a list action means: the highlighted one when the list has focus,
        else the open one."""
        view = self.query_one("#conversations", ListView)
        if self.focused is view and view.highlighted_child is not None:
            return view.highlighted_child.conversation_id
        return self.conversation_id

    def action_rename(self):
        conversation_id = self.target_conversation()
        if conversation_id is None:
            self.notify("Send a message first: a new chat is saved with its first message.")
            return

        async def rename(title: str | None):
            if title:
                self.history.rename(conversation_id, title)
                await self.refresh_sidebar()
        self.app.push_screen(PromptScreen("Rename conversation",
                                          self.history.get(conversation_id).title), rename)

    def action_delete(self):
        conversation_id = self.target_conversation()
        if conversation_id is None:
            return
        title = self.history.get(conversation_id).title

        async def delete(yes: bool | None):
            if not yes:
                return
            if conversation_id == self.conversation_id:
                await self.stop_if_replying()
                self.history.delete(conversation_id)
                await self.show_conversation(None)
            else:
                self.history.delete(conversation_id)
            await self.refresh_sidebar()
            self.notify(f"Deleted {title!r}.")
        self.app.push_screen(ConfirmScreen(f"Delete {title!r} and all its messages?"), delete)

    def action_export(self):
        conversation_id = self.target_conversation()
        if conversation_id is None:
            self.notify("Nothing to export yet.")
            return
        title = self.history.get(conversation_id).title
        slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "conversation"
        default = str(Path.cwd() / f"{slug}.md")

        def export(path: str | None):
            if not path:
                return
            target = Path(path).expanduser()
            try:
                target.write_text(self.history.export_markdown(conversation_id))
            except OSError as e:
                self.notify(f"{target}: {e.strerror or e}", title="Export failed",
                            severity="error")
                return
            self.notify(f"Saved to {target}", title="Exported")
        self.app.push_screen(PromptScreen("Export as Markdown to", default), export)

    def action_help(self):
        self.app.push_screen(HelpScreen(help_text(self.history.path)))

    @on(ListView.Selected, "#conversations")
    async def open_selected(self, event: ListView.Selected):
        conversation_id = getattr(event.item, "conversation_id", None)
        if conversation_id is not None and conversation_id != self.conversation_id:
            await self.stop_if_replying()
            await self.show_conversation(conversation_id)
        self.query_one("#input").focus()

    # slash commands
    async def command(self, text: str):
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/new":
            await self.action_new_chat()
            if arg:  # a title now means the chat is saved now, empty, under that title
                conv = self.history.create(arg, self.settings.system, self.settings.sampling())
                self.conversation_id = conv.id
                await self.refresh_sidebar()
        elif name == "/system":
            if not arg:
                self.action_settings()
                return
            await self.apply_settings(Settings(arg, self.settings.temperature,
                                               self.settings.top_p, self.settings.max_tokens))
        elif name == "/temp":
            if not arg:
                self.notify(f"temperature {self.settings.temperature}")
                return
            try:
                settings = Settings(self.settings.system, parse_number(arg, "temperature"),
                                    self.settings.top_p, self.settings.max_tokens)
                settings.check()
            except ValueError as e:
                self.notify(str(e), severity="error")
                return
            await self.apply_settings(settings)
        elif name == "/clear":
            await self.stop_if_replying()
            if self.conversation_id is not None:
                self.history.clear(self.conversation_id)
                await self.show_conversation(self.conversation_id)
            self.notify("Cleared this conversation's messages.")
        elif name == "/help":
            self.action_help()
        else:
            self.notify(f"{name}: unknown command (try /new, /system, /temp, /clear, /help)",
                        severity="error")


# ---------------------------------------------------------------------------------------------
# The app

class ChatApp(App):
    """Loads the model (with progress), then opens the chat.

    `volatile=False` leaves timings and memory figures out of the status bar and stops the
    cursor blinking, for snapshots.
    `loader` stands in for qlite.load in tests."""
    TITLE = "qlite chat"
    CSS = """
    #loading-box { width: 70; height: auto; margin: 4 0 0 0; padding: 1 2;
                   border: round $accent; }
    LoadingScreen { align: center top; }
    #logo { text-style: bold; color: $accent; }
    #stage { margin: 1 0 0 0; color: $text-muted; }
    #load-bar { margin: 1 0 0 0; }
    #load-error { display: none; color: $error; margin: 1 0 0 0; }
    #load-error.-shown { display: block; }

    #body { height: 1fr; }
    #sidebar { width: 30; border-right: vkey $panel-lighten-2; }
    #sidebar.-hidden { display: none; }
    #sidebar-title { padding: 0 1; text-style: bold; background: $panel; }
    #conversations { height: 1fr; background: $surface; }
    #conversations > ListItem { padding: 0 1; }
    #sidebar-hint { color: $text-muted; padding: 0 1; }
    #chat { width: 1fr; }
    #messages { height: 1fr; padding: 0 1 1 1; }
    #welcome, #system-line { color: $text-muted; margin: 1 0 0 0; }
    MessageBox { height: auto; margin: 1 0 0 0; padding: 0 1; }
    MessageBox.user { border-left: outer $accent; background: $boost; }
    MessageBox.assistant { border-left: outer $success; }
    MessageBox > .role { text-style: bold; color: $text-muted; }
    MessageBox > Markdown { margin: 0; padding: 0; background: transparent; }
    MessageBox > Markdown > *:last-child { margin-bottom: 0; }
    MessageBox > .error { color: $error; }
    #notice { display: none; padding: 0 1; color: $warning; background: $warning 15%; }
    #notice.-shown { display: block; }
    #input { height: auto; min-height: 3; max-height: 10; border: round $accent 50%;
             padding: 0 1; }
    #input:focus { border: round $accent; }
    #status { height: 1; padding: 0 1; background: $panel; color: $text-muted; }

    .dialog { width: 76; height: auto; max-height: 90%; padding: 1 2;
              border: round $accent; background: $surface; }
    ModalScreen { align: center middle; }
    .dialog-title { text-style: bold; margin: 0 0 1 0; }
    .hint { color: $text-muted; margin: 1 0 0 0; }
    .buttons { height: auto; margin: 1 0 0 0; }
    .buttons Button { margin: 0 1 0 0; }
    #settings #system { height: 6; }
    #settings .fields { height: auto; margin: 1 0 0 0; }
    #settings .fields > Vertical { height: auto; width: 1fr; }
    #settings-error { color: $error; }
    #search #results { height: auto; max-height: 16; margin: 1 0 0 0; }
    #help { width: 90; height: auto; }
    """

    def __init__(self, model="demo", *, device=None, dtype=None, context: int | None = None,
                 history: str | Path | History | None = None, volatile: bool = True,
                 loader=None, load_options: dict | None = None, **sampling):
        super().__init__()
        self.model_spec, self.device, self.dtype, self.context = model, device, dtype, context
        self.load_options = load_options or {}  # more qlite.load options: backend, gpu_budget...
        self.history_spec = history
        self.history: History | None = None
        self.volatile = volatile
        self.loader = loader or qlite.load
        sampling_params(**sampling)  # a bad fixed value fails here, before any loading
        self.sampling = sampling  # fixed extras for generate: top_k, repetition_penalty, seed
        self.model = None
        self.chat_screen: ChatScreen | None = None
        self.load_thread: threading.Thread | None = None
        self.closing = threading.Event()  # tells the loading thread to give up
        self.load_error: str | None = None  # why the model (or the history) did not load

    def on_mount(self):
        try:
            self.history = (self.history_spec if isinstance(self.history_spec, History)
                            else History(self.history_spec))
        except QliteError as e:
            self.load_error = str(e)
            self.push_screen(LoadingScreen(f"Loading {self.model_spec}"))
            self.screen.show_error(str(e))
            return
        self.push_screen(LoadingScreen(self.loading_heading()))
        self.load_thread = threading.Thread(target=self.load_model, name="qlite-load",
                                            daemon=True)
        self.load_thread.start()

    def loading_heading(self) -> str:
        if str(self.model_spec) != "demo":
            return f"Loading {self.model_spec}"
        try:  # the first run pulls the demo model here, inside the app, with its progress
            from qlite.pull import demo_model_dir, is_complete
            if not is_complete(demo_model_dir()):
                return "Downloading the demo model (first run only, about 490 MB)"
        except (ImportError, AttributeError):
            pass
        return "Loading the demo model"

    def load_model(self):
        """The loading thread: progress goes to the screen at most 20 times a second."""
        last = {"stage": None, "t": 0.0}

        def progress(stage: str, done: int, total: int):
            if self.closing.is_set():
                raise QliteError("cancelled: the app is closing")
            now = time.monotonic()
            if stage == last["stage"] and done < total and now - last["t"] < 0.05:
                return
            last.update(stage=stage, t=now)
            self.call_from_thread(self.loading_progress, stage, done, total)

        device = self.device
        if device is None:
            import torch  # already imported by qlite
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = self.loader(self.model_spec, device=device, dtype=self.dtype,
                                context=self.context, progress=progress, **self.load_options)
            result, error = model, None
        except QliteError as e:
            result, error = None, str(e)
        except Exception as e:  # out of memory, a broken download: say so, keep the terminal
            result, error = None, f"{type(e).__name__}: {e}"
        if self.closing.is_set():
            return
        try:
            self.call_from_thread(self.loaded, result, error)
        except RuntimeError:  # the app closed meanwhile
            pass

    def loading_progress(self, stage: str, done: int, total: int):
        if isinstance(self.screen, LoadingScreen):
            self.screen.show_progress(stage, done, total)

    async def loaded(self, model, error: str | None):
        if error is not None:
            self.load_error = error
            self.screen.show_error(error)
            return
        self.model = model
        self.sub_title = model_name(model)
        self.chat_screen = ChatScreen(model, self.history, self.volatile, self.sampling)
        await self.switch_screen(self.chat_screen)

    def on_unmount(self):
        # Stop the threads and wait for them: a load gives up at its next progress report, a
        # reply at its next token. Leaving torch running in a thread while Python shuts down
        # aborts the process ("terminate called without an active exception").
        self.closing.set()
        chat = self.chat_screen
        if chat is not None and chat.reply is not None:
            chat.reply.cancel.set()
        for thread in (self.load_thread, chat.thread if chat is not None else None):
            if thread is not None:
                thread.join(timeout=60)


def main(model="demo", device=None, dtype=None, context: int | None = None,
         load_options: dict | None = None, **options) -> str | None:
    """`qlite chat`: run the chat on `model` (a directory, or "demo"). Returns None, or why
    the model did not load (the caller exits non-zero with it).

    load_options: more keyword arguments of qlite.load (backend, gpu_budget, expert_slots,
    prefetch...). options: `history` (path of the SQLite file; default under
    $XDG_DATA_HOME/qlite), and fixed sampling extras passed to every generate call (top_k,
    repetition_penalty, seed)."""
    app = ChatApp(model, device=device, dtype=dtype, context=context, load_options=load_options,
                  **options)
    app.run()
    return app.load_error


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m qlite.tui", description=main.__doc__)
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--history", default=None, help="SQLite file of the conversations")
    args = parser.parse_args()
    error = main(args.model, device=args.device, dtype=args.dtype, context=args.context,
                 history=args.history)
    if error:
        raise SystemExit(f"qlite: error: {error}")
