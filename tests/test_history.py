"""The conversation store, without any screen."""
import sqlite3

import pytest

from qlite.errors import QliteError
from qlite.history import DEFAULT_SETTINGS, History, data_dir, default_path, snippet, title_from


def test_data_dir_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "qlite"
    assert default_path() == tmp_path / "qlite" / "history.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "qlite"


def test_messages_are_on_disk_as_soon_as_they_are_written(tmp_path):
    path = tmp_path / "h.db"
    h = History(path)
    conv = h.create("hello")
    h.add(conv.id, "user", "hi")
    reply = h.add(conv.id, "assistant", "he")
    h.update(reply, "hello there", {"finish_reason": "stop"})
    # a second connection (another process, or the app after a kill) sees it all at once
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT role, content FROM messages ORDER BY id").fetchall() == [
        ("user", "hi"), ("assistant", "hello there")]
    assert [m.meta for m in History(path).messages(conv.id)] == [{}, {"finish_reason": "stop"}]


def test_conversations_new_rename_delete_and_order(tmp_path):
    h = History(tmp_path / "h.db")
    a = h.create("first")
    b = h.create("second")
    h.add(a.id, "user", "bump a")  # a was used last, so it comes first
    assert [c.title for c in h.conversations()] == ["first", "second"]
    h.rename(b.id, "renamed")
    assert h.get(b.id).title == "renamed"
    h.delete(a.id)
    assert [c.id for c in h.conversations()] == [b.id]
    assert h.messages(a.id) == []  # its messages went with it
    with pytest.raises(QliteError, match="no conversation"):
        h.get(a.id)


def test_settings_and_system_prompt_are_per_conversation(tmp_path):
    h = History(tmp_path / "h.db")
    a = h.create("a", system="be brief", settings={"temperature": 0.2})
    b = h.create("b")
    assert a.settings == dict(DEFAULT_SETTINGS, temperature=0.2)
    assert b.settings == DEFAULT_SETTINGS and b.system == ""
    h.set_settings(b.id, {"temperature": 1.1, "top_p": 0.5, "max_tokens": 64})
    h.set_system(b.id, "pirate")
    reopened = History(tmp_path / "h.db")
    assert reopened.get(b.id).settings == {"temperature": 1.1, "top_p": 0.5, "max_tokens": 64}
    assert reopened.get(b.id).system == "pirate"
    assert reopened.get(a.id).system == "be brief"


def test_delete_from_and_clear(tmp_path):
    h = History(tmp_path / "h.db")
    c = h.create()
    ids = [h.add(c.id, r, t) for r, t in [("user", "1"), ("assistant", "2"),
                                          ("user", "3"), ("assistant", "4")]]
    h.delete_from(c.id, ids[2])
    assert [m.content for m in h.messages(c.id)] == ["1", "2"]
    h.clear(c.id)
    assert h.messages(c.id) == [] and h.get(c.id).title == "New chat"


def test_search_across_conversations(tmp_path):
    h = History(tmp_path / "h.db")
    a = h.create("Rust questions")
    h.add(a.id, "user", "How do I read a file?")
    b = h.create("Python")
    h.add(b.id, "user", "what is a 100% list comprehension")
    h.add(b.id, "assistant", "A compact way to build a LIST from an iterable.")
    assert [c.title for c, _ in h.search("list")] == ["Python"]
    assert h.search("list")[0][1].startswith("what is a 100% list")
    assert [c.title for c, _ in h.search("rust")] == ["Rust questions"]  # titles match too
    assert [c.title for c, _ in h.search("100%")] == ["Python"]  # % is not a wildcard
    assert h.search("5%") == [] and h.search("   ") == []


def test_export_markdown(tmp_path):
    h = History(tmp_path / "h.db")
    c = h.create("Code", system="You write Python.")
    h.add(c.id, "user", "Print hi")
    h.add(c.id, "assistant", "```python\nprint('hi')\n```")
    assert h.export_markdown(c.id) == (
        "# Code\n\n**System:** You write Python.\n\n## You\n\nPrint hi\n\n"
        "## Assistant\n\n```python\nprint('hi')\n```\n")


def test_unwritable_location_is_a_qlite_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(QliteError, match="cannot open the conversation history"):
        History(tmp_path / "file" / "h.db")


def test_titles_and_snippets():
    assert title_from("  Hello   world\nsecond line") == "Hello world"
    assert title_from("") == "New chat"
    long = "explain the difference between processes and threads in detail please"
    assert title_from(long) == "explain the difference between…"
    text = "a" * 100 + " needle " + "b" * 100
    s = snippet(text, "NEEDLE")
    assert "needle" in s and s.startswith("…") and s.endswith("…")
