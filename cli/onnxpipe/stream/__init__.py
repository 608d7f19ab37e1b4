"""Readers, the length-sorting batcher and writers: the line contract lives here."""
