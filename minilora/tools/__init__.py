"""The command line and what it runs: the demos, the benchmarks, the self-check.

    cli          ``minilora`` (demo, gradcheck, bench, oracle)
    demo         ``minilora demo``: LoRA on a digits MLP
    demo_model   ``minilora demo --model``: a tiny LLaMA pretrained, then adapted
    bench        ``minilora bench``: the layer and the blocks against their floors and torch
    bench_model  ``minilora bench --model``: a LLaMA training step against transformers + PEFT
    selfcheck    ``minilora gradcheck``: every gradient against finite differences, here
    _argtypes    the argument types the CLIs share
"""
