"""One module per task family: batches of tokenized records in, results out. Never reads or prints."""
