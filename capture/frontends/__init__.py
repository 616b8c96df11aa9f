"""Frontends: what builds the ExportedProgram that the passes and the lowering start from.

"dscompile" captures our reference model (model/transformer.py, capture/__init__.py);
"transformers" captures transformers' own DeepseekV2/V3ForCausalLM (frontends/transformers.py)
under the same engine IO contract, with the few export patches of frontends/transformers_patches.py.
Both produce a program with the same inputs and outputs (same pytree structure, dynamic dims and
`dsc_source` weights), so everything after the capture is shared. transformers is an optional
dependency: it is imported only inside the functions of its frontend.
"""

FRONTENDS = ("dscompile", "transformers")
