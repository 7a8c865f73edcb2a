"""Serving a trained run: the chat demo (chat.py), its model thread (chat_worker.py) and its page (assets/)."""
