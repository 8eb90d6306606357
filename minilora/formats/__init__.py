"""File formats, read strictly (what the format's reference reader accepts) and written
atomically (a file is whole or absent).

    safetensors  the .safetensors reader and writer (headers checked before any tensor is read)
    npz          .npz without pickles
    peft         PEFT adapter folders (adapter_config.json + adapter_model.safetensors)
    _json        the strict JSON reader the config and adapter files share
    _io          atomic writes
"""
