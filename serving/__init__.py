"""Serving: Rollstream's own OpenAI-compatible policy server (transformers + torch).

vLLM is the production engine on GPU; this server is for CPU and tests. Both return the
engine's token ids and logprobs, so nothing downstream re-tokenizes.
"""
