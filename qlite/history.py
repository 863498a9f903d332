"""Saved conversations: one SQLite file, kept apart from the screen so it can be tested alone.

The database lives in `$XDG_DATA_HOME/qlite/history.db` (else `~/.local/share/qlite/`). It runs
in WAL mode and every change is committed at once, so a crash or a kill loses nothing that was
already written. The chat writes each message as it completes (and a streaming reply now and
then while it grows).

Each conversation carries its own system prompt and sampling settings, so resuming it resumes
the way it was being generated too.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlite.errors import QliteError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id          INTEGER PRIMARY KEY,
    title       TEXT    NOT NULL,
    system      TEXT    NOT NULL DEFAULT '',
    settings    TEXT    NOT NULL DEFAULT '{}',   -- JSON: temperature, top_p, max_tokens
    created     REAL    NOT NULL,
    updated     REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: ids order the turns
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT    NOT NULL,            -- 'user' or 'assistant'
    content         TEXT    NOT NULL,
    meta            TEXT    NOT NULL DEFAULT '{}', -- JSON: finish reason, token counts
    created         REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""

# What a new conversation starts with. Qwen2.5's own generation_config uses top_p 0.8.
DEFAULT_SETTINGS = {"temperature": 0.7, "top_p": 0.8, "max_tokens": 512}


def data_dir() -> Path:
    """`$XDG_DATA_HOME/qlite`, else `~/.local/share/qlite` (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return Path(base) / "qlite"


def default_path() -> Path:
    return data_dir() / "history.db"


@dataclass
class Message:
    id: int
    role: str
    content: str
    meta: dict = field(default_factory=dict)

    def as_chat(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    id: int
    title: str
    system: str
    settings: dict
    created: float
    updated: float


class History:
    """The conversation store. One connection, used from the thread that opened it."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit: each statement is its own transaction, so nothing waits in memory
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise QliteError(f"{self.path}: cannot open the conversation history ({e})") from None

    def close(self):
        self.db.close()

    # conversations
    def create(self, title: str = "New chat", system: str = "",
               settings: dict | None = None) -> Conversation:
        now = time.time()
        settings = dict(DEFAULT_SETTINGS, **(settings or {}))
        cur = self.db.execute(
            "INSERT INTO conversations (title, system, settings, created, updated) "
            "VALUES (?, ?, ?, ?, ?)", (title, system, json.dumps(settings), now, now))
        return self.get(cur.lastrowid)

    def get(self, conversation_id: int) -> Conversation:
        row = self.db.execute("SELECT id, title, system, settings, created, updated "
                              "FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise QliteError(f"{self.path}: no conversation {conversation_id}")
        return self._conversation(row)

    def conversations(self) -> list[Conversation]:
        """All conversations, the most recently used first."""
        rows = self.db.execute("SELECT id, title, system, settings, created, updated "
                               "FROM conversations ORDER BY updated DESC, id DESC").fetchall()
        return [self._conversation(r) for r in rows]

    def rename(self, conversation_id: int, title: str):
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?",
                        (title, conversation_id))

    def delete(self, conversation_id: int):
        self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def set_system(self, conversation_id: int, system: str):
        self.db.execute("UPDATE conversations SET system = ? WHERE id = ?",
                        (system, conversation_id))

    def set_settings(self, conversation_id: int, settings: dict):
        self.db.execute("UPDATE conversations SET settings = ? WHERE id = ?",
                        (json.dumps(settings), conversation_id))

    # messages
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute("SELECT id, role, content, meta FROM messages "
                               "WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [Message(i, role, content, json.loads(meta)) for i, role, content, meta in rows]

    def add(self, conversation_id: int, role: str, content: str, meta: dict | None = None) -> int:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO messages (conversation_id, role, content, meta, created) "
            "VALUES (?, ?, ?, ?, ?)", (conversation_id, role, content, json.dumps(meta or {}), now))
        self._touch(conversation_id, now)
        return cur.lastrowid

    def update(self, message_id: int, content: str, meta: dict | None = None):
        """Rewrite a message: a streaming reply as it grows, then once more when it ends."""
        if meta is None:
            self.db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
        else:
            self.db.execute("UPDATE messages SET content = ?, meta = ? WHERE id = ?",
                            (content, json.dumps(meta), message_id))

    def delete_from(self, conversation_id: int, message_id: int):
        """Delete a message and everything after it (regenerate, edit and resend)."""
        self.db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                        (conversation_id, message_id))

    def clear(self, conversation_id: int):
        self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))

    # search and export
    def search(self, text: str, limit: int = 50) -> list[tuple[Conversation, str]]:
        """Conversations whose title or messages contain `text` (case-insensitive), newest
        first, each with a one-line snippet around the first match."""
        text = text.strip()
        if not text:
            return []
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            "SELECT c.id, c.title, c.system, c.settings, c.created, c.updated, "
            "  (SELECT m.content FROM messages m WHERE m.conversation_id = c.id "
            "   AND m.content LIKE ?1 ESCAPE '\\' ORDER BY m.id LIMIT 1) "
            "FROM conversations c WHERE c.title LIKE ?1 ESCAPE '\\' OR EXISTS "
            "  (SELECT 1 FROM messages m WHERE m.conversation_id = c.id "
            "   AND m.content LIKE ?1 ESCAPE '\\') "
            "ORDER BY c.updated DESC, c.id DESC LIMIT ?2", (pattern, limit)).fetchall()
        return [(self._conversation(r[:6]), snippet(r[6] or r[1], text)) for r in rows]

    def export_markdown(self, conversation_id: int) -> str:
        conv = self.get(conversation_id)
        parts = [f"# {conv.title}\n"]
        if conv.system:
            parts.append(f"**System:** {conv.system}\n")
        for m in self.messages(conversation_id):
            parts.append(f"## {'You' if m.role == 'user' else 'Assistant'}\n\n{m.content}\n")
        return "\n".join(parts)

    def _touch(self, conversation_id: int, now: float):
        self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
                        (now, conversation_id))

    @staticmethod
    def _conversation(row) -> Conversation:
        i, title, system, settings, created, updated = row
        return Conversation(i, title, system, dict(DEFAULT_SETTINGS, **json.loads(settings)),
                            created, updated)


def snippet(content: str, text: str, width: int = 60) -> str:
    """One line of `content` around the first case-insensitive occurrence of `text`."""
    flat = " ".join(content.split())
    at = flat.lower().find(text.lower())
    if at < 0:
        return flat[:width]
    start = max(0, at - width // 3)
    out = flat[start:start + width]
    return ("…" if start else "") + out + ("…" if start + width < len(flat) else "")


def title_from(text: str, width: int = 40) -> str:
    """A conversation title from its first message: the first line, cut at a word."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if len(line) <= width:
        return line or "New chat"
    cut = line[:width].rsplit(" ", 1)[0]
    return (cut if len(cut) > width // 2 else line[:width]) + "…"
