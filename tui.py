"""The Textual chat (issue 6)."""
