"""`onnxpipe batch`: resumable jobs over files and folders, one output shard per input file.

plan (what to read and where each output goes), shards (reading an input file as records, writing
an output shard atomically), job (the manifest in the output folder that makes a rerun resume or
refuse) and the engines that run a plan: local (worker processes on this machine) and ray_engine.
"""
