"""Chat history in SQLite (WAL): chats and their messages, saved while an answer streams.

A streaming answer is written as a row with status 'streaming' and updated (one small committed
transaction) at most about once a second and at the end, so a crash or kill loses at most the last
second. On the next open, rows still marked 'streaming' become 'interrupted': the partial answer
stays visible and the user can regenerate it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HISTORY_NAME = "history.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL DEFAULT '',
    reasoning TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'complete',
    stats TEXT NOT NULL DEFAULT '{}',
    attachments TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
"""

# Statuses of a message row.
COMPLETE, STREAMING, STOPPED, INTERRUPTED, FAILED = (
    "complete",
    "streaming",
    "stopped",
    "interrupted",
    "error",
)


@dataclass
class Chat:
    id: int
    title: str
    created: float
    updated: float


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str = ""
    reasoning: str = ""
    mode: str = ""
    status: str = COMPLETE
    stats: dict[str, Any] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0


class HistoryError(RuntimeError):
    """The history database could not be opened or written (message says what to do)."""


class History:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=5.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.commit()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise HistoryError(
                f"The chat history at {self.path} could not be opened ({exc}). "
                "Move that file aside (your chats are in it) and restart FlashDesk to begin a new one."
            ) from exc
        self.recovered = self._recover_interrupted()

    @classmethod
    def in_folder(cls, folder: Path) -> History:
        return cls(Path(folder) / HISTORY_NAME)

    def close(self) -> None:
        self.db.close()

    def _recover_interrupted(self) -> int:
        cur = self.db.execute(
            "UPDATE messages SET status=? WHERE status=?", (INTERRUPTED, STREAMING)
        )
        self.db.commit()
        return cur.rowcount

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            cur = self.db.execute(sql, params)
            self.db.commit()
            return cur
        except sqlite3.DatabaseError as exc:
            raise HistoryError(
                f"Saving to the chat history at {self.path} failed ({exc}). "
                "Check that the disk is not full and the folder is writable."
            ) from exc

    # chats -------------------------------------------------------------------------------------
    def create_chat(self, title: str = "New chat") -> Chat:
        now = time.time()
        cur = self._write(
            "INSERT INTO chats(title, created, updated) VALUES (?, ?, ?)", (title, now, now)
        )
        return Chat(int(cur.lastrowid), title, now, now)

    def chats(self, search: str = "") -> list[Chat]:
        """Newest first; `search` matches titles and message text (case-insensitive)."""
        if search:
            like = f"%{search}%"
            rows = self.db.execute(
                "SELECT DISTINCT c.id, c.title, c.created, c.updated FROM chats c "
                "LEFT JOIN messages m ON m.chat_id = c.id "
                "WHERE c.title LIKE ? OR m.content LIKE ? OR m.reasoning LIKE ? "
                "ORDER BY c.updated DESC, c.id DESC",
                (like, like, like),
            )
        else:
            rows = self.db.execute(
                "SELECT id, title, created, updated FROM chats ORDER BY updated DESC, id DESC"
            )
        return [Chat(*row) for row in rows]

    def chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute(
            "SELECT id, title, created, updated FROM chats WHERE id=?", (chat_id,)
        ).fetchone()
        return Chat(*row) if row else None

    def rename_chat(self, chat_id: int, title: str) -> None:
        self._write(
            "UPDATE chats SET title=?, updated=? WHERE id=?", (title.strip(), time.time(), chat_id)
        )

    def delete_chat(self, chat_id: int) -> None:
        self._write("DELETE FROM chats WHERE id=?", (chat_id,))

    # messages ----------------------------------------------------------------------------------
    def add_message(
        self,
        chat_id: int,
        role: str,
        content: str = "",
        *,
        reasoning: str = "",
        mode: str = "",
        status: str = COMPLETE,
        stats: dict | None = None,
        attachments: list | None = None,
    ) -> Message:
        now = time.time()
        cur = self._write(
            "INSERT INTO messages(chat_id, role, content, reasoning, mode, status, stats, "
            "attachments, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                chat_id,
                role,
                content,
                reasoning,
                mode,
                status,
                json.dumps(stats or {}),
                json.dumps(attachments or []),
                now,
                now,
            ),
        )
        self._write("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
        return Message(
            int(cur.lastrowid),
            chat_id,
            role,
            content,
            reasoning,
            mode,
            status,
            dict(stats or {}),
            list(attachments or []),
            now,
            now,
        )

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        reasoning: str | None = None,
        status: str | None = None,
        stats: dict | None = None,
    ) -> None:
        sets, params = ["updated=?"], [time.time()]
        for column, value in (("content", content), ("reasoning", reasoning), ("status", status)):
            if value is not None:
                sets.append(f"{column}=?")
                params.append(value)
        if stats is not None:
            sets.append("stats=?")
            params.append(json.dumps(stats))
        params.append(message_id)
        self._write(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", tuple(params))

    def delete_message(self, message_id: int) -> None:
        self._write("DELETE FROM messages WHERE id=?", (message_id,))

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, chat_id, role, content, reasoning, mode, status, stats, attachments, "
            "created, updated FROM messages WHERE chat_id=? ORDER BY id",
            (chat_id,),
        )
        out = []
        for row in rows:
            msg = Message(*row)
            msg.stats = _loads(msg.stats, {})
            msg.attachments = _loads(msg.attachments, [])
            out.append(msg)
        return out

    # export ------------------------------------------------------------------------------------
    def export_json(self, chat_id: int) -> str:
        chat = self.chat(chat_id)
        if chat is None:
            raise HistoryError(f"Chat {chat_id} no longer exists.")
        return json.dumps(
            {
                "title": chat.title,
                "created": chat.created,
                "messages": [
                    {
                        "role": m.role,
                        "content": m.content,
                        "reasoning": m.reasoning,
                        "mode": m.mode,
                        "status": m.status,
                        "stats": m.stats,
                        "attachments": m.attachments,
                        "created": m.created,
                    }
                    for m in self.messages(chat_id)
                ],
            },
            ensure_ascii=False,
            indent=2,
        )

    def export_markdown(self, chat_id: int) -> str:
        chat = self.chat(chat_id)
        if chat is None:
            raise HistoryError(f"Chat {chat_id} no longer exists.")
        parts = [f"# {chat.title}", ""]
        for m in self.messages(chat_id):
            who = {"user": "You", "assistant": "FlashDesk", "system": "System"}[m.role]
            parts.append(f"## {who}" + (f" ({m.mode})" if m.mode and m.role == "assistant" else ""))
            parts.append("")
            for a in m.attachments:
                parts.append(f"Attached: {a.get('name', '?')} ({a.get('tokens', '?')} tokens)")
            if m.reasoning:
                parts.append("<details><summary>Reasoning</summary>")
                parts.append("")
                parts.append(m.reasoning)
                parts.append("")
                parts.append("</details>")
                parts.append("")
            parts.append(m.content)
            if m.status in (STOPPED, INTERRUPTED, FAILED):
                parts.append(f"\n*({m.status})*")
            parts.append("")
        return "\n".join(parts)


def _loads(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default
