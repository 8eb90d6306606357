"""The functional core: each op's forward and backward side by side, with the finite-difference
check that proves them.

    functional   lora_forward / lora_backward, dora_forward / dora_backward (the public entries)
    blocks       the fused blocks: lora_qkv, lora_mlp, multi_lora (many adapters in one batch)
    dora         DoRA's equations
    lora_numpy   backend="numpy": the readable reference
    lora_numba   backend="numba": the fast kernels, tested against the reference
    backends     which backend runs a call
    gradcheck    central differences against a backward, in float64
    _checks, _jit  input validation; Numba's options
"""
