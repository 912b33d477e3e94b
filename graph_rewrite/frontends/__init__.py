"""Front ends: each finds activation calls in one kind of program and applies the rules table.

* :mod:`.fx`: trace with torch.fx, rewrite the graph (:mod:`.fx_pass`), keep the model's structure.
* :mod:`.torchscript`: copy a ScriptModule into its own compilation unit, rewrite every function's graph.
"""
