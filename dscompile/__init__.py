"""dscompile: compile DeepSeek-V2/V3 checkpoints into verified inference engines.

    import dscompile

    dscompile.export("ckpt", "out")                        # checkpoint -> engine folder
    llm = dscompile.load("out")                            # the engine and its tokenizer
    print(llm.generate("Once upon a time", max_new_tokens=32))
    for piece in llm.stream("The compiler"):               # text as it is decoded
        print(piece, end="", flush=True)
    print(llm.chat([{"role": "user", "content": "Hello!"}]))
    assert dscompile.compare("ckpt", "out")["passed"]      # numerics against PyTorch eager

The repository's folders are its subpackages: dscompile.model (checkpoints, the reference
model), dscompile.passes (graph passes), dscompile.exporter (capture, lowering, the CLI) and
dscompile.runtime (engines, generation, text).
"""

from dscompile.api import compare, export, load
from dscompile.errors import DscompileError

__all__ = ["DscompileError", "compare", "export", "load"]
__version__ = "0.1.0"
