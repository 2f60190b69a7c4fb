"""Run folders and their records: ``results.json`` (what a head or a fine-tuned network scored,
with what, in how long), where runs live, and the lock that keeps two processes out of one.

``results`` reads and writes the record; ``folders`` names run folders and locks them.
"""
