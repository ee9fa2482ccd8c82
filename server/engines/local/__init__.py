"""The in-process engine: every size of a family served from one LayerStore, side by side.

``engine``      LocalEngine: the Engine API on the event loop, one worker thread, continuous batching
``packed``      one forward step over the tokens of every running request of every size
``request``     one request inside the engine and the events its tokens become
``sampling``    per-request token choice and logprobs
``detokenize``  incremental text and stop strings
``stats``       live speed estimates the router predicts latency from
"""
