"""dscompile: compile DeepSeek-V2/V3 checkpoints into verified inference engines.

    import dscompile

    dscompile.export("ckpt", "out")                        # checkpoint -> engine folder
    llm = dscompile.load("out")                            # the engine and its tokenizer
    print(llm.generate("Once upon a time", max_new_tokens=32))
    for piece in llm.stream("The compiler"):               # text as it is decoded
        print(piece, end="", flush=True)
    print(llm.chat([{"role": "user", "content": "Hello!"}]))
    assert dscompile.compare("ckpt", "out")["passed"]      # numerics against PyTorch eager
    print(dscompile.eval("out", "text.txt", reference="ckpt")["perplexity"])   # quality on real text

The repository's folders are its subpackages, in the order data flows: dscompile.model
(checkpoints, the reference model), dscompile.capture (torch.export of the engine contract),
dscompile.passes (graph rewrites), dscompile.lowering (ONNX and TensorRT), dscompile.exporter (the
export job and OUT), dscompile.verify (engines against eager), dscompile.runtime (engines,
generation, text), dscompile.cli (the command line) and dscompile.bench (measurements).
"""

from dscompile.api import compare, eval, export, load  # noqa: A004 - dscompile.eval
from dscompile.errors import DscompileError

__all__ = ["DscompileError", "compare", "eval", "export", "load"]
__version__ = "0.1.0"
