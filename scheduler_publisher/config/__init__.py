"""The entries file: parsed (document.py), checked field by field (fields.py, rules.py),
built into frozen `PublishConfig`s (entry.py, loader.py), with cron, templates, shards and
the JSON Schema. Pure apart from reading the file; imports only logs/ below it.
"""
