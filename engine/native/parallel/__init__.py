"""Expert parallelism across processes: a torch.distributed group per engine replica.

Rank 0 runs the whole engine and broadcasts each step's model inputs
(``driver.py``, ``broadcast.py``); ranks 1.. run only the model forward on
their slice of the routed experts (``worker.py``). The MoE combine is an
all-reduce over the group (``group.py``).
"""
