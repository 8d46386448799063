import os

# Tests use tiny tensors: one thread avoids oversubscribing a small CI machine, where
# several torch threads on tiny matmuls spend their time spinning, not computing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LADA_THREADS", "1")  # lada.threads would give each run its share of the cores

import tempfile  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

# Warm-ups the tests trigger go to a per-session cache (shipped checkpoints are still
# found first); subprocesses of the Flower engines inherit it.
os.environ.setdefault("LADA_CACHE", tempfile.mkdtemp(prefix="lada-test-cache-"))
