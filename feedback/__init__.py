"""Feedback side of tuneloop: SQLite log of turns, votes and corrections; curation into datasets."""
