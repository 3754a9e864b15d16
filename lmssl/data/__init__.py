"""Data: loading sources into `datasets` (text.py), the offline builtin sets (builtin.py)."""
