"""One module per route family, as vLLM's ``entrypoints/openai`` splits them.

:mod:`.base` holds what every route shares (requests to Meta-exact
prompts, sampling options, the JSON-or-SSE answer); :mod:`.chat` and
:mod:`.completion` shape their own responses and chunks.
"""
