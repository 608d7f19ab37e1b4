"""One module per task family: batches of tokenized records in, results out. Never reads or prints.

encoder.EncoderTask is the shared base of the encoder tasks (classify, embed, tag, fill_mask):
truncating tokenization, padding to the longest row, one session run per batch. The protocol
every task implements is documented in onnxpipe.stream.
"""
